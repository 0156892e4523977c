"""Media sources: only what the policy allows, bounded in bytes and time; refusals say which flag to change."""

import base64
import os
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlserve.errors import MediaError, MediaTooLargeError
from vlserve.media import fetch
from vlserve.media.fetch import MediaPolicy, _host_allowed, content_hash, fetch_bytes

PAYLOAD = b"\x89PNG fake image bytes" * 10


@pytest.fixture
def root(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.png").write_bytes(PAYLOAD)
    (tmp_path / "secret.txt").write_bytes(b"secret")
    return tmp_path / "media"


# ---- local files


def test_local_path_file_url_and_relative_path(root):
    policy = MediaPolicy(allowed_local_media_path=str(root))
    assert fetch_bytes(str(root / "a.png"), policy) == PAYLOAD
    assert fetch_bytes((root / "a.png").as_uri(), policy) == PAYLOAD
    assert fetch_bytes("file://localhost" + str(root / "a.png"), policy) == PAYLOAD
    assert fetch_bytes("a.png", policy) == PAYLOAD  # relative to the allowed root


def test_local_media_disabled_without_root(root):
    for source in (str(root / "a.png"), (root / "a.png").as_uri()):
        with pytest.raises(MediaError, match="--allowed-local-media-path DIR"):
            fetch_bytes(source, MediaPolicy())


@pytest.mark.parametrize(
    "make_source",
    [
        lambda root: str(root.parent / "secret.txt"),
        lambda root: str(root / ".." / "secret.txt"),
        lambda root: "../secret.txt",
        lambda root: (root.parent / "secret.txt").as_uri(),
        lambda root: "/etc/passwd",
    ],
    ids=["absolute", "dotdot", "relative-dotdot", "file-url", "etc-passwd"],
)
def test_local_path_outside_root(root, make_source):
    source = make_source(root)
    with pytest.raises(MediaError, match=r"outside the folder the server allows \(--allowed-local-media-path\); "
                                         ".*wider --allowed-local-media-path") as err:
        fetch_bytes(source, MediaPolicy(allowed_local_media_path=str(root)))
    assert_no_server_paths(str(err.value), source, root)


def assert_no_server_paths(message: str, source: str, root) -> None:
    """The message may echo what the client sent, never the server's root or a path the server resolved."""
    rest = message.replace(repr(source), "")
    assert str(root) not in rest and os.path.realpath(root) not in rest
    assert "secret.txt" not in rest and "/dev/" not in rest


def test_symlink_pointing_outside_root(root):
    os.symlink(root.parent / "secret.txt", root / "link.png")
    os.symlink(root.parent, root / "up")
    policy = MediaPolicy(allowed_local_media_path=str(root))
    for source in (str(root / "link.png"), str(root / "up" / "secret.txt"), "link.png"):
        with pytest.raises(MediaError, match="outside the folder the server allows") as err:
            fetch_bytes(source, policy)
        assert_no_server_paths(str(err.value), source, root)


def test_symlinked_root_and_inside_links_work(root, tmp_path):
    os.symlink(root, tmp_path / "alias")
    os.symlink(root / "a.png", root / "b.png")
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path / "alias"))
    assert fetch_bytes(str(root / "b.png"), policy) == PAYLOAD


def test_local_file_missing_or_too_large(root):
    with pytest.raises(MediaError, match="cannot read local media 'missing.png': No such file or directory$"):
        fetch_bytes("missing.png", MediaPolicy(allowed_local_media_path=str(root)))
    small = MediaPolicy(allowed_local_media_path=str(root), max_bytes=10)
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        fetch_bytes(str(root / "a.png"), small)


def test_unreadable_file_names_no_server_path(root):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    (root / "locked.png").write_bytes(PAYLOAD)
    os.chmod(root / "locked.png", 0)
    with pytest.raises(MediaError, match="cannot read local media 'locked.png': Permission denied$"):
        fetch_bytes("locked.png", MediaPolicy(allowed_local_media_path=str(root)))


def fetch_within(seconds: float, source: str, policy: MediaPolicy) -> BaseException | None:
    """fetch_bytes in a thread, failing the test if it has not returned after `seconds` (a blocked open)."""
    outcome: list[BaseException | None] = []

    def run():
        try:
            fetch_bytes(source, policy)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"fetch_bytes({source!r}) still running after {seconds} s: it blocked"
    return outcome[0]


@pytest.mark.timeout(20)
def test_fifo_refused_without_blocking(root):
    os.mkfifo(root / "pipe.mp4")
    policy = MediaPolicy(allowed_local_media_path=str(root))
    start = time.perf_counter()
    error = fetch_within(5, "pipe.mp4", policy)
    assert isinstance(error, MediaError)
    assert "local media 'pipe.mp4' is not a regular file (a FIFO, device or socket)" in str(error)
    assert time.perf_counter() - start < 1


def stat_as(monkeypatch, path, other) -> None:
    """os.stat(path) answers for `other`: as if `path` were swapped between fetch's stat and its open."""
    real_stat = os.stat
    target = os.path.realpath(path)
    monkeypatch.setattr(fetch.os, "stat", lambda p, *a, **k: real_stat(other if p == target else p, *a, **k))


@pytest.mark.timeout(20)
def test_fifo_swapped_in_after_the_check_is_refused_without_blocking(root, monkeypatch):
    # the race: the path is a regular file when stat-ed, a FIFO when opened; the open must not block
    os.mkfifo(root / "pipe.mp4")
    stat_as(monkeypatch, root / "pipe.mp4", root / "a.png")
    error = fetch_within(5, "pipe.mp4", MediaPolicy(allowed_local_media_path=str(root)))
    assert isinstance(error, MediaError) and "not a regular file" in str(error)


def test_file_swapped_after_the_check_is_refused(root, monkeypatch):
    (root / "b.png").write_bytes(PAYLOAD)
    stat_as(monkeypatch, root / "b.png", root / "a.png")
    with pytest.raises(MediaError, match="'b.png' changed while being opened; send the request again"):
        fetch_bytes("b.png", MediaPolicy(allowed_local_media_path=str(root)))


def test_folder_refused(root):
    (root / "sub").mkdir()
    policy = MediaPolicy(allowed_local_media_path=str(root))
    for source in ("sub", str(root / "sub"), str(root)):
        with pytest.raises(MediaError, match="is a folder; send the path of an image or video file") as err:
            fetch_bytes(source, policy)
        assert_no_server_paths(str(err.value), source, root)


def test_socket_refused(root):
    import socket

    path = root / "s.sock"
    if len(str(path)) > 100:
        pytest.skip("socket paths are limited to ~108 bytes")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(MediaError, match="not a regular file"):
            fetch_bytes("s.sock", MediaPolicy(allowed_local_media_path=str(root)))


@pytest.mark.timeout(20)
def test_device_refused(root):
    # a link inside the root to a device resolves outside the root: refused before any stat or open
    os.symlink("/dev/zero", root / "zero.png")
    policy = MediaPolicy(allowed_local_media_path=str(root))
    with pytest.raises(MediaError, match="outside the folder the server allows") as err:
        fetch_bytes("zero.png", policy)
    assert_no_server_paths(str(err.value), "zero.png", root)
    # a device node inside the root (only root may make one): refused as not a regular file, never read
    try:
        os.mknod(root / "null.png", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    except (PermissionError, OSError):
        return
    error = fetch_within(5, "null.png", policy)
    assert isinstance(error, MediaError) and "not a regular file (a FIFO, device or socket)" in str(error)


def test_file_url_with_remote_host(root):
    with pytest.raises(MediaError, match="file:///absolute/path"):
        fetch_bytes("file://otherhost/etc/passwd", MediaPolicy(allowed_local_media_path=str(root)))


# ---- data URLs and schemes


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_data_url():
    assert fetch_bytes(data_url(PAYLOAD), MediaPolicy()) == PAYLOAD


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_truncated_base64(cut):
    with pytest.raises(MediaError, match="invalid base64 .*send the complete base64 text"):
        fetch_bytes(data_url(PAYLOAD)[:-cut], MediaPolicy())


def test_invalid_base64_and_non_base64_data_url():
    with pytest.raises(MediaError, match="invalid base64"):
        fetch_bytes("data:image/png;base64,ab$d", MediaPolicy())
    with pytest.raises(MediaError, match="use data:<mime>;base64,<data>"):
        fetch_bytes("data:image/png,rawbytes", MediaPolicy())


def test_data_url_over_max_bytes():
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        fetch_bytes(data_url(bytes(4000)), MediaPolicy(max_bytes=1000))


@pytest.mark.parametrize("source", ["ftp://example.com/a.png", "gopher://x/y", "s3://bucket/key.png"])
def test_unknown_scheme(source):
    with pytest.raises(MediaError, match=r"use http\(s\)://, data:<mime>;base64,..., file:// or a local path"):
        fetch_bytes(source, MediaPolicy())


# ---- http(s)


def test_http_refused_when_no_domain_allowed():
    start = time.perf_counter()
    with pytest.raises(MediaError, match="allowed: none.*--allowed-media-domains example.com"):
        fetch_bytes("https://example.com/cat.png", MediaPolicy())
    assert time.perf_counter() - start < 0.5  # refused without any network attempt


@pytest.mark.parametrize(
    "host,allowed",
    [
        ("example.com", True),
        ("img.example.com", True),
        ("IMG.Example.COM.", True),
        ("badexample.com", False),
        ("example.com.evil.net", False),
        ("com", False),
    ],
)
def test_host_matching(host, allowed):
    assert _host_allowed(host, ("example.com",)) is allowed


def test_userinfo_does_not_fool_host_check():
    policy = MediaPolicy(allowed_media_domains=("example.com",))
    with pytest.raises(MediaError, match="'evil.net' is not allowed"):
        fetch_bytes("http://example.com@evil.net/a.png", policy)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        try:
            self.route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (limits under test)

    def route(self):
        if self.path == "/ok.png":
            self.reply(200, PAYLOAD)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.end_headers()
        elif self.path == "/declared-big":
            self.reply(200, bytes(5000))
        elif self.path == "/undeclared-big":  # HTTP/1.0: no length, body ends at close
            self.send_response(200)
            self.end_headers()
            for _ in range(5):
                self.wfile.write(bytes(1000))
        elif self.path == "/stall":
            time.sleep(1.5)
            self.reply(200, PAYLOAD)
        elif self.path == "/drip":  # each byte inside the read timeout, the whole body far past it
            self.send_response(200)
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/gzip":
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.end_headers()
        else:
            self.reply(404, b"not found")

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


LOCAL = MediaPolicy(allowed_media_domains=("127.0.0.1",), timeout_s=0.5, max_bytes=1000)


def test_http_allowed_host(server):
    assert fetch_bytes(server + "/ok.png", LOCAL) == PAYLOAD


def test_http_other_host_refused(server):
    with pytest.raises(MediaError, match="--allowed-media-domains 127.0.0.1"):
        fetch_bytes(server + "/ok.png", MediaPolicy(allowed_media_domains=("example.com",)))


def test_redirect_refused(server):
    with pytest.raises(MediaError, match="HTTP 302.*'/ok.png'.*redirects are not followed: send the final URL"):
        fetch_bytes(server + "/redirect", LOCAL)


@pytest.mark.parametrize("path", ["/declared-big", "/undeclared-big"])
def test_http_over_max_bytes(server, path):
    with pytest.raises(MediaTooLargeError, match="limit of 1,000 bytes \\(max_bytes\\); send a smaller file"):
        fetch_bytes(server + path, LOCAL)


@pytest.mark.parametrize("path", ["/stall", "/drip"])
def test_http_timeout(server, path):
    start = time.perf_counter()
    with pytest.raises(MediaError, match="timed out after 0.5 s; use a faster host or send the media inline"):
        fetch_bytes(server + path, LOCAL)
    assert time.perf_counter() - start < 1.4


def test_http_error_status_and_compressed_body(server):
    with pytest.raises(MediaError, match="returned HTTP 404; check the URL"):
        fetch_bytes(server + "/missing.png", LOCAL)
    with pytest.raises(MediaError, match="serve the media uncompressed"):
        fetch_bytes(server + "/gzip", LOCAL)


def test_content_hash_is_stable_and_unambiguous():
    assert content_hash(b"ab", "c") == content_hash("ab", b"c")
    assert content_hash("ab", "c") != content_hash("a", "bc")
    assert len(content_hash(b"")) == 64
