"""Media sources: only what the policy allows, bounded in bytes and time; refusals say which flag to change."""

import base64
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlserve.errors import MediaError, MediaTooLargeError
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
    with pytest.raises(MediaError, match="outside --allowed-local-media-path .*wider --allowed-local-media-path"):
        fetch_bytes(make_source(root), MediaPolicy(allowed_local_media_path=str(root)))


def test_symlink_pointing_outside_root(root):
    os.symlink(root.parent / "secret.txt", root / "link.png")
    os.symlink(root.parent, root / "up")
    policy = MediaPolicy(allowed_local_media_path=str(root))
    for source in (str(root / "link.png"), str(root / "up" / "secret.txt")):
        with pytest.raises(MediaError, match="outside --allowed-local-media-path"):
            fetch_bytes(source, policy)


def test_symlinked_root_and_inside_links_work(root, tmp_path):
    os.symlink(root, tmp_path / "alias")
    os.symlink(root / "a.png", root / "b.png")
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path / "alias"))
    assert fetch_bytes(str(root / "b.png"), policy) == PAYLOAD


def test_local_file_missing_or_too_large(root):
    with pytest.raises(MediaError, match="cannot read local media"):
        fetch_bytes(str(root / "missing.png"), MediaPolicy(allowed_local_media_path=str(root)))
    small = MediaPolicy(allowed_local_media_path=str(root), max_bytes=10)
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        fetch_bytes(str(root / "a.png"), small)


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
