"""Image normalization, decompression-bomb and size limits, safe paths, guarded URL fetches."""

from __future__ import annotations

import hashlib
import http.server
import io
import ipaddress
import os
import socket
import threading
import time
import urllib.parse

import pytest
from PIL import Image

from mllm_msr.config import ConfigError, ImageConfig, IngestConfig, config_from_dict
from mllm_msr.data.images import (
    HostAllowlist,
    ImageError,
    address_problem,
    fetch_url,
    image_set_hash,
    normalize_image,
    read_image_file,
    safe_join,
)


def png(size=(64, 48), mode="RGB", colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else None).save(out, format="PNG")
    return out.getvalue()


def test_normalize_resizes_converts_and_hashes():
    cfg = ImageConfig(max_side=32, format="JPEG")
    img = normalize_image(png((128, 64)), cfg)
    assert (img.width, img.height) == (32, 16)
    assert img.sha256 == hashlib.sha256(img.data).hexdigest()
    with Image.open(io.BytesIO(img.data)) as decoded:
        assert decoded.format == "JPEG" and decoded.mode == "RGB" and decoded.size == (32, 16)
    assert normalize_image(png((128, 64)), cfg) == img  # deterministic


def test_normalize_converts_palette_and_alpha_to_rgb():
    cfg = ImageConfig(max_side=64, format="PNG")
    for mode in ("RGBA", "P", "L"):
        img = normalize_image(png((20, 20), mode=mode), cfg)
        with Image.open(io.BytesIO(img.data)) as decoded:
            assert decoded.mode == "RGB" and decoded.size == (20, 20)


@pytest.mark.parametrize(
    "data",
    [b"not an image at all", b"", png()[:40], b"\x89PNG\r\n\x1a\n" + b"\x00" * 100],
)
def test_corrupt_images_are_refused(data):
    with pytest.raises(ImageError) as err:
        normalize_image(data, ImageConfig())
    assert err.value.reason == "corrupt_image"


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png((4000, 4000))  # a few KB on disk, 16 Mpx decoded
    assert len(bomb) < 200_000
    with pytest.raises(ImageError) as err:
        normalize_image(bomb, ImageConfig(max_pixels=1_000_000))
    assert err.value.reason == "decompression_bomb"


def test_oversized_file_is_refused(tmp_path):
    data = png((64, 64))
    with pytest.raises(ImageError) as err:
        normalize_image(data, ImageConfig(max_bytes=len(data) - 1))
    assert err.value.reason == "oversized_image"
    (tmp_path / "big.png").write_bytes(data)
    with pytest.raises(ImageError) as err:
        read_image_file(tmp_path, "big.png", max_bytes=10)
    assert err.value.reason == "oversized_image"


def test_safe_join_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(png())
    os.symlink(tmp_path / "secret.png", root / "link.png")
    assert safe_join(root, "sub/a.png") == (root / "sub" / "a.png").resolve()
    for bad in (
        "../secret.png",
        "sub/../../secret.png",
        "/etc/passwd",
        str(tmp_path),
        "link.png",
        "..",
    ):
        with pytest.raises(ImageError) as err:
            safe_join(root, bad)
        assert err.value.reason == "path_escape", bad


def test_paths_that_name_no_file_are_bad_image_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    for bad in ("", " ", ".", "./", "sub/..", "a\x00.png", "sub"):
        with pytest.raises(ImageError) as err:
            read_image_file(tmp_path, bad, max_bytes=100)
        assert err.value.reason == "bad_image_path", bad


def test_missing_file_and_set_hash(tmp_path):
    with pytest.raises(ImageError) as err:
        read_image_file(tmp_path, "nope.jpg", max_bytes=100)
    assert err.value.reason == "missing_image"
    assert image_set_hash([]) == ""
    assert image_set_hash(["a", "b"]) != image_set_hash(["b", "a"])


# --------------------------------------------------------------------------- URL fetches


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/ok.png``; ``/drip-body`` and ``/drip-headers`` (a byte every 0.5 s);
    ``/redirect?to=URL``; ``/loop`` (redirects to itself)."""

    def do_GET(self):  # noqa: N802
        self.server.paths.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        try:
            if url.path == "/ok.png":
                self._answer(200, png())
            elif url.path == "/redirect":
                self._redirect(urllib.parse.parse_qs(url.query)["to"][0])
            elif url.path == "/loop":
                self._redirect("/loop")
            elif url.path == "/drip-body":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                self._drip(b"x" * 100)
            elif url.path == "/drip-headers":
                self._drip(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 100)
            else:
                self._answer(404, b"")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.server.stopping.is_set():
                return
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            time.sleep(0.5)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.paths, httpd.stopping = [], threading.Event()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.stopping.set()
    httpd.shutdown()
    httpd.server_close()


def fetch(url: str, **kw) -> bytes:
    args = {"timeout_s": 2.0, "retries": 1, "max_bytes": 100_000, "backoff_s": 0.05}
    return fetch_url(url, **{**args, **kw})


def fetch_error(url: str, **kw) -> ImageError:
    with pytest.raises(ImageError) as err:
        fetch(url, **kw)
    return err.value


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.7", "private"),
        ("fd12::1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-global"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback (127.0.0.1 inside 2002:7f00:1::)"),  # 6to4
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_problem(address, problem):
    assert address_problem(ipaddress.ip_address(address)) == problem


def test_allowlist_parses_names_and_networks():
    allow = HostAllowlist.parse(["127.0.0.1", "10.0.0.0/8", "[::1]", "Images.Internal."])
    assert allow.names == {"images.internal"}
    assert allow.allows_address(ipaddress.ip_address("10.9.8.7"))
    assert allow.allows_address(ipaddress.ip_address("::1"))
    assert not allow.allows_address(ipaddress.ip_address("127.0.0.2"))
    for bad in ("not a host", "http://x", "a/b/c"):
        with pytest.raises(ConfigError):
            HostAllowlist.parse([bad])
    cfg = config_from_dict({"ingest": {"http_allow_hosts": ["127.0.0.1"]}}).ingest
    assert cfg.http_allow_hosts == ["127.0.0.1"] and cfg.http_deadline_s > 0
    assert IngestConfig().http_allow_hosts == []  # default: public addresses only


def test_loopback_is_refused_unless_allowlisted(server):
    port = server.server_address[1]
    for url in (
        f"{server.url}/ok.png",
        f"http://localhost:{port}/ok.png",
        f"http://[::ffff:127.0.0.1]:{port}/ok.png",
        f"http://2130706433:{port}/ok.png",  # 127.0.0.1 as one number: resolved, then checked
    ):
        err = fetch_error(url)
        assert err.reason == "blocked_address", (url, err)
    assert server.paths == []  # refused before connecting
    assert fetch(f"{server.url}/ok.png", allow=["127.0.0.1"]) == png()
    assert fetch(f"http://localhost:{port}/ok.png", allow=["localhost"]) == png()


def test_redirects_are_checked_at_every_hop(server):
    allow = HostAllowlist.parse(["127.0.0.1"])
    port = server.server_address[1]
    ok = urllib.parse.quote(f"{server.url}/ok.png")
    assert fetch(f"{server.url}/redirect?to={ok}", allow=allow) == png()
    for target in (
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.png",
        f"http://127.0.0.2:{port}/ok.png",  # loopback, but not the allowlisted address
        f"http://[::ffff:10.0.0.1]:{port}/ok.png",
    ):
        url = f"{server.url}/redirect?to={urllib.parse.quote(target)}"
        t0 = time.monotonic()
        err = fetch_error(url, allow=allow)
        assert err.reason == "blocked_address" and time.monotonic() - t0 < 1.0, (target, err)
    assert fetch_error(f"{server.url}/redirect?to=file:///etc/passwd", allow=allow).reason == (
        "bad_url"
    )
    assert fetch_error(f"{server.url}/loop", allow=allow).reason == "http_error"


def test_every_resolved_address_is_checked(monkeypatch):
    def fake_getaddrinfo(host, port, *args, **kw):
        assert host == "mixed.example"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    def no_connect(*args, **kw):
        raise AssertionError("connected to a host with a blocked address")

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    err = fetch_error("http://mixed.example/a.png")
    assert err.reason == "blocked_address" and "127.0.0.1" in err.detail


@pytest.mark.parametrize("path", ["/drip-body", "/drip-headers"])
def test_a_drip_fed_answer_is_cut_at_the_deadline(server, path):
    t0 = time.monotonic()
    err = fetch_error(server.url + path, allow=["127.0.0.1"], deadline_s=1.0, retries=2)
    elapsed = time.monotonic() - t0
    assert err.reason == "fetch_timeout", err
    assert 0.9 < elapsed < 1.0 + 0.75, elapsed  # the per-read timeout (2 s) never tripped


def test_a_slow_dns_lookup_is_cut_at_the_deadline(monkeypatch):
    def slow_getaddrinfo(*args, **kw):
        time.sleep(3)
        raise OSError("too late")

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    t0 = time.monotonic()
    err = fetch_error("http://slow-dns.example/a.png", deadline_s=0.5)
    assert err.reason == "fetch_timeout" and time.monotonic() - t0 < 1.0
