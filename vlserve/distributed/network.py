"""Which network interface reaches the head node, so Gloo and NCCL bind to the right NIC on every machine.

Machines name their NICs differently (eth0, ens5, enp1s0f0), so one cluster-wide GLOO_SOCKET_IFNAME cannot work;
each node asks its own kernel which interface routes to the head. Binding to the wrong one is the classic
"worker joins, then drops" failure: the address it advertises is one the other nodes cannot reach.
"""

import ctypes
import socket
from dataclasses import dataclass

from vlserve.errors import ConfigError

# Ray's default GCS port. The port only matters under policy routing on ports, so any valid one finds the route.
DEFAULT_HEAD_PORT = 6379


@dataclass(frozen=True)
class Interface:
    name: str
    local_ip: str


def parse_head_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (a name, an IPv4 address or a bracketed IPv6 address) -> (host, port)."""
    example = "e.g. 10.0.0.1:6379, head-node:6379 or [fd00::1]:6379"
    if "://" in address:
        raise ConfigError(f"head address {address!r} has a scheme; give just HOST:PORT, {example}")
    text = address.strip()
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise ConfigError(f"head address {address!r} needs a port after the bracketed IPv6 address, {example}")
        port = port[1:]
    else:
        host, colon, port = text.rpartition(":")
        if ":" in host:
            raise ConfigError(f"head address {address!r} looks like a bare IPv6 address; put it in brackets, {example}")
        if not colon:
            raise ConfigError(f"head address {address!r} needs a port, {example}")
    if not host:
        raise ConfigError(f"head address {address!r} needs a host before the port, {example}")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"port {port!r} in head address {address!r} must be a number from 1 to 65535, {example}")
    return host, int(port)


def route_interface(head_ip: str, port: int = DEFAULT_HEAD_PORT) -> Interface:
    """The interface, and this node's address on it, that the kernel would use to reach `head_ip` (an address or a
    host name). Sends nothing: connecting a UDP socket only looks up the route and picks a source address."""
    local_ip = _source_ip(head_ip, port)
    # Name the interface that owns the source address: that is the address Gloo and NCCL bind to and advertise.
    for interface in list_interfaces():
        if interface.local_ip == local_ip:
            return interface
    raise ConfigError(f"this node reaches head {head_ip} from {local_ip}, which is on no interface. {_hint()}")


def interface_env(interface: Interface) -> dict[str, str]:
    """Environment that makes Gloo and NCCL on this node use `interface`."""
    # Gloo matches names exactly; NCCL matches prefixes (eth1 would also pick eth10) unless the name starts with '='.
    return {"GLOO_SOCKET_IFNAME": interface.name, "NCCL_SOCKET_IFNAME": "=" + interface.name}


def list_interfaces() -> list[Interface]:
    """Every IPv4 and IPv6 address on this node with its interface name, one entry per address.

    Read with getifaddrs(3), the call Gloo and NCCL use themselves, so we see what they see: secondary addresses
    included (the SIOCGIFADDR ioctl returns one IPv4 address per interface) and no dependency on iproute2."""
    head = ctypes.POINTER(_Ifaddrs)()
    if _libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    try:
        found, node = [], head
        while node:
            entry = node.contents
            ip = _sockaddr_ip(entry.addr) if entry.addr else None
            if ip is not None:
                found.append(Interface(entry.name.decode(), ip))
            node = entry.next
        return found
    finally:
        _libc.freeifaddrs(head)


def _source_ip(head: str, port: int) -> str:
    try:
        candidates = socket.getaddrinfo(head, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve head address {head!r} ({e.strerror}); check the name or give the head's "
                          f"IP address. {_hint()}") from None
    failures = []
    for family, kind, proto, _, address in candidates:  # in the resolver's order of preference, as a client would
        with socket.socket(family, kind, proto) as s:
            try:
                s.connect(address)
            except OSError as e:
                failures.append(f"{address[0]}: {e.strerror}")
                continue
            return s.getsockname()[0].partition("%")[0]  # drop an IPv6 link-local scope to compare with getifaddrs
    raise ConfigError(f"no route from this node to head {head!r} ({'; '.join(failures)}); check the address and "
                      f"this node's routes (ip route get ADDRESS). {_hint()}")


def _hint() -> str:
    names = ", ".join(dict.fromkeys(i.name for i in list_interfaces()))
    return f"To choose the interface by hand, pass --interface NAME (this node has: {names})."


class _Ifaddrs(ctypes.Structure):
    pass


# struct ifaddrs from <ifaddrs.h>; the same layout on glibc and musl.
_Ifaddrs._fields_ = [("next", ctypes.POINTER(_Ifaddrs)), ("name", ctypes.c_char_p), ("flags", ctypes.c_uint),
                     ("addr", ctypes.c_void_p), ("netmask", ctypes.c_void_p), ("ifu", ctypes.c_void_p),
                     ("data", ctypes.c_void_p)]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_Ifaddrs))]
_libc.freeifaddrs.argtypes = [ctypes.POINTER(_Ifaddrs)]

# Where the address sits in sockaddr_in (after family and port) and sockaddr_in6 (after family, port, flowinfo).
_ADDRESS_AT = {socket.AF_INET: (4, 4), socket.AF_INET6: (8, 16)}


def _sockaddr_ip(sockaddr: int) -> str | None:
    family = ctypes.c_ushort.from_address(sockaddr).value  # Linux sockaddr starts with a 16-bit family
    if family not in _ADDRESS_AT:
        return None  # AF_PACKET (link-layer) entries carry no IP
    offset, size = _ADDRESS_AT[family]
    return socket.inet_ntop(family, ctypes.string_at(sockaddr + offset, size))
