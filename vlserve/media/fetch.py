"""Safe media sources: local files under one root, allowed domains only, byte limits, no redirects.

Contracts:
- Local media is read only from a regular file whose resolved path (symlinks and `..` resolved) lies under
  --allowed-local-media-path; FIFOs, devices, sockets and folders are refused without blocking (the path is
  stat-ed before opening, opened non-blocking, and the opened file checked again).
- Error messages hold only what the client sent (shortened) and the flag to change, never a path the server
  resolved or the server's own folder.
- Every source is read up to policy.max_bytes (+1 to detect overflow): MediaTooLargeError beyond.
"""

import base64
import functools
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httpx

from vlserve.errors import MediaError, MediaTooLargeError


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_media_path: str | None = None  # None: no local files at all
    allowed_media_domains: tuple[str, ...] = ()  # empty: no http(s) media at all
    timeout_s: float = 10.0
    max_bytes: int = 64 * 1024 * 1024


def content_hash(*parts: bytes | str) -> str:
    """sha256 hex over length-prefixed parts, so ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def fetch_bytes(source: str, policy: MediaPolicy) -> bytes:
    """Bytes of a local path, file:// URL, data:<mime>;base64 URL or http(s):// URL, within `policy`."""
    url = urlsplit(source)
    scheme = url.scheme.lower()
    if scheme == "":
        return _read_local(source, source, policy)
    if scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise MediaError(f"file URL {source!r} names host {url.netloc!r}; use file:///absolute/path")
        return _read_local(unquote(url.path), source, policy)
    if scheme == "data":
        return _decode_data_url(source, policy)
    if scheme in ("http", "https"):
        return _download(source, policy)
    raise MediaError(
        f"unsupported media URL scheme {scheme!r} in {_short(source)!r}; "
        "use http(s)://, data:<mime>;base64,..., file:// or a local path"
    )


def _short(source: str) -> str:
    # data URLs can be megabytes long: keep error messages readable
    return source if len(source) <= 100 else source[:100] + "..."


def _too_large(what: str, policy: MediaPolicy) -> MediaTooLargeError:
    return MediaTooLargeError(
        f"{what} is larger than the server's media limit of {policy.max_bytes:,} bytes (max_bytes); "
        "send a smaller file"
    )


def _read_local(path: str, source: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_media_path is None:
        raise MediaError(
            f"local media {_short(source)!r} refused: local files are disabled; "
            "start the server with --allowed-local-media-path DIR to allow files under DIR"
        )
    root = os.path.realpath(policy.allowed_local_media_path)
    # relative paths are relative to the root; realpath resolves `..` and symlinks before the check
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise MediaError(
            f"local media {_short(source)!r} is outside the folder the server allows (--allowed-local-media-path); "
            "move the file into that folder or start the server with a wider --allowed-local-media-path"
        )
    try:
        data = _read_regular_file(real, source, policy.max_bytes + 1)  # +1: bounded, yet overflow shows
    except OSError as e:  # e.strerror only: str(e) would show the resolved path
        raise MediaError(f"cannot read local media {_short(source)!r}: {e.strerror or type(e).__name__}") from e
    if len(data) > policy.max_bytes:
        raise _too_large(f"local media {_short(source)!r}", policy)
    return data


def _read_regular_file(real: str, source: str, limit: int) -> bytes:
    """At most `limit` bytes of the regular file at `real`. A FIFO, device, socket or folder is refused before
    it is opened (opening a FIFO blocks; opening some devices acts on them), and again once opened, non-blocking,
    in case the path was swapped in between."""
    expected = os.stat(real)
    _require_regular(expected, source)
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    try:
        opened = os.fstat(fd)
        _require_regular(opened, source)
        if (opened.st_dev, opened.st_ino) != (expected.st_dev, expected.st_ino):
            raise MediaError(f"local media {_short(source)!r} changed while being opened; send the request again")
        with open(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)


def _require_regular(st: os.stat_result, source: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise MediaError(f"local media {_short(source)!r} is {kind}; send the path of an image or video file")


def _decode_data_url(source: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = source[len("data:") :].partition(",")
    if not comma or header.split(";")[-1].lower() != "base64":
        raise MediaError(f"data URL {_short(source)!r} is not base64; use data:<mime>;base64,<data>")
    if len(payload) // 4 * 3 > policy.max_bytes:  # refuse before decoding
        raise _too_large("data URL", policy)
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as e:  # binascii.Error, or a non-ASCII character
        raise MediaError(
            f"data URL holds invalid base64 ({e}); it may be truncated: send the complete base64 text"
        ) from e


def _host_allowed(host: str, domains: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for domain in domains:
        domain = domain.lower().rstrip(".")
        if host == domain or host.endswith("." + domain):
            return True
    return False


@functools.cache
def _client() -> httpx.Client:
    # one shared client: building one costs ~30 ms (TLS context), and it is thread-safe
    return httpx.Client(follow_redirects=False)


def _download(source: str, policy: MediaPolicy) -> bytes:
    try:
        url = httpx.URL(source)  # the same parser decides the host we check and the host we contact
    except httpx.InvalidURL as e:
        raise MediaError(f"invalid media URL {_short(source)!r}: {e}") from e
    if not url.host or not _host_allowed(url.host, policy.allowed_media_domains):
        allowed = ", ".join(policy.allowed_media_domains) or "none"
        raise MediaError(
            f"media URL host {url.host!r} is not allowed (allowed: {allowed}); add it to the server's "
            f"--allowed-media-domains (e.g. --allowed-media-domains {url.host or 'DOMAIN'})"
        )
    deadline = time.monotonic() + policy.timeout_s  # the httpx timeout is per read; this bounds the whole body
    try:
        # identity encoding: a gzip body could inflate far past max_bytes inside a single chunk
        with _client().stream(
            "GET", url, timeout=policy.timeout_s, headers={"Accept-Encoding": "identity"}
        ) as response:
            _check_response(source, response, policy)
            chunks, size = [], 0
            for chunk in response.iter_raw():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise _too_large(f"media at {source!r}", policy)
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("body not received in time")
                chunks.append(chunk)
    except httpx.TimeoutException as e:
        raise MediaError(
            f"fetching {source!r} timed out after {policy.timeout_s} s; use a faster host or send the media inline "
            "as a data: URL"
        ) from e
    except httpx.HTTPError as e:
        raise MediaError(f"fetching {source!r} failed: {type(e).__name__}: {e}") from e
    return b"".join(chunks)


def _check_response(source: str, response: httpx.Response, policy: MediaPolicy) -> None:
    status = response.status_code
    if 300 <= status < 400:
        location = response.headers.get("location", "?")
        raise MediaError(
            f"{source!r} redirects (HTTP {status}) to {location!r}; redirects are not followed: "
            "send the final URL (its domain must be in --allowed-media-domains)"
        )
    if status != 200:
        raise MediaError(f"fetching {source!r} returned HTTP {status}; check the URL")
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise MediaError(f"{source!r} was sent with Content-Encoding {encoding!r}; serve the media uncompressed")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise _too_large(f"media at {source!r} ({int(declared):,} bytes)", policy)
