"""Image validation and normalization, safe paths, bounded HTTP fetches.

Every image that enters the run directory goes through :func:`normalize_image`: decoded and
verified with Pillow, refused when the file is too large (``max_bytes``) or when its declared
size exceeds ``max_pixels`` (a decompression bomb: the check happens on the header, before any
pixel is decoded), converted to RGB, resized so that its longest side is at most ``max_side``,
re-encoded (JPEG or PNG) and hashed (sha256 of the normalized bytes).

Image URLs are fetched by :func:`fetch_url`: per-read timeouts plus an overall deadline, a size
limit, retries, and only public addresses (after DNS, and after every redirect) unless the
config's allowlist names the host.

Failures raise :class:`ImageError` whose ``reason`` is the short code written to
``quarantine/`` (:data:`REASONS`).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import ipaddress
import os
import posixpath
import re
import socket
import ssl
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from mllm_msr.config import ConfigError, ImageConfig

REASONS = (
    "missing_image",  # the file does not exist
    "oversized_image",  # more bytes than ImageConfig.max_bytes
    "decompression_bomb",  # more pixels than ImageConfig.max_pixels
    "corrupt_image",  # Pillow cannot identify, verify or decode it
    "path_escape",  # a manifest path that leaves the dataset root
    "bad_image_path",  # empty, ".", NUL, a directory: names no file under the root
    "unreadable_image",  # the file exists but reading it fails (permissions, I/O error)
    "bad_url",  # not an http(s) URL
    "http_error",  # an HTTP status >= 400 (404 ...), too many redirects
    "fetch_failed",  # timeouts / connection errors after the retries
    "fetch_timeout",  # the fetch did not end within IngestConfig.http_deadline_s
    "blocked_address",  # a URL (or redirect) to a non-public address not in http_allow_hosts
)


class ImageError(Exception):
    """An image was rejected; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NormalizedImage:
    """Re-encoded RGB image bytes and their sha256."""

    data: bytes
    sha256: str
    width: int
    height: int


def normalize_image(data: bytes, cfg: ImageConfig) -> NormalizedImage:
    """Verify, convert to RGB, bound the size and re-encode ``data`` (see module docstring)."""
    if len(data) > cfg.max_bytes:
        raise ImageError("oversized_image", f"{len(data)} bytes > max_bytes={cfg.max_bytes}")
    if not data:
        raise ImageError("corrupt_image", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > cfg.max_pixels:
                    raise ImageError(
                        "decompression_bomb",
                        f"{width}x{height} pixels > max_pixels={cfg.max_pixels}",
                    )
                probe.verify()
            # verify() leaves the image unusable: decode it again for real.
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = img.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("decompression_bomb", str(exc)) from None
    except Exception as exc:  # Pillow raises many types for broken files
        raise ImageError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    if max(rgb.size) > cfg.max_side:
        rgb.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if cfg.format == "JPEG":
        rgb.save(out, format="JPEG", quality=cfg.quality, optimize=False)
    else:
        rgb.save(out, format="PNG", optimize=False)
    encoded = out.getvalue()
    return NormalizedImage(encoded, hashlib.sha256(encoded).hexdigest(), *rgb.size)


def image_set_hash(hashes: list[str]) -> str:
    """The item-level image hash: sha256 over the ordered per-image hashes ("" when none)."""
    if not hashes:
        return ""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


# --------------------------------------------------------------------------- local files


def safe_join(root: str | os.PathLike, relative: str) -> Path:
    """Join ``relative`` under ``root``; refuse absolute paths, ``..`` and symlinks that escape.

    Raises :class:`ImageError` with reason ``path_escape``, or ``bad_image_path`` for a path that
    names no file (empty, NUL bytes, the root itself such as ``.``).
    """
    if not relative or not relative.strip() or "\x00" in relative:
        raise ImageError("bad_image_path", f"invalid path {relative!r}")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or ":" in (rel.parts or ("",))[0]:
        raise ImageError("path_escape", f"absolute path {relative!r}")
    base = Path(root).resolve()
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ImageError("bad_image_path", f"{relative!r}: {exc}") from None
    if target == base:
        raise ImageError("bad_image_path", f"{relative!r} names the image folder itself")
    if base not in target.parents:
        raise ImageError("path_escape", f"{relative!r} resolves outside {base}")
    return target


def relative_key(relative: str) -> str:
    """``relative`` as a normalized key under a folder on object storage (no symlinks there).

    Refuses what :func:`safe_join` refuses: absolute paths, drive/scheme prefixes and ``..``
    that leaves the folder (``path_escape``), and names of no file (``bad_image_path``).
    """
    if not relative or not relative.strip() or "\x00" in relative:
        raise ImageError("bad_image_path", f"invalid path {relative!r}")
    first = relative.replace("\\", "/").split("/", 1)[0]
    if relative.startswith(("/", "\\")) or ":" in first:
        raise ImageError("path_escape", f"absolute path {relative!r}")
    key = posixpath.normpath(relative.replace("\\", "/"))
    if key == ".":
        raise ImageError("bad_image_path", f"{relative!r} names the image folder itself")
    if key == ".." or key.startswith("../"):
        raise ImageError("path_escape", f"{relative!r} resolves outside the image folder")
    return key


@functools.lru_cache(maxsize=8)
def _remote_fs(root: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(root)


def _read_remote_image(root: str, relative: str, max_bytes: int) -> bytes:
    """Read an image under a folder on object storage (``s3://...``), size-checked first."""
    import pyarrow.fs as pafs

    key = relative_key(relative)
    try:
        fs, base = _remote_fs(root)
        path = base.rstrip("/") + "/" + key
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            raise ImageError("bad_image_path", f"{relative!r} is a directory")
        if info.type != pafs.FileType.File:
            raise ImageError("missing_image", f"no file {relative!r} under {root}")
        if info.size is not None and info.size > max_bytes:
            raise ImageError(
                "oversized_image", f"{relative!r}: {info.size} bytes > max_bytes={max_bytes}"
            )
        with fs.open_input_stream(path) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:  # permissions, network errors
        raise ImageError("unreadable_image", f"{relative!r}: {exc}") from None
    if len(data) > max_bytes:
        raise ImageError("oversized_image", f"{relative!r}: more than max_bytes={max_bytes}")
    return data


def read_image_file(root: str | os.PathLike, relative: str, max_bytes: int) -> bytes:
    """Read an image file under ``root`` (size-checked before reading).

    ``root``: a local folder or a folder on object storage (a pyarrow URI such as ``s3://...``).
    """
    if isinstance(root, str) and "://" in root and not root.startswith("file://"):
        return _read_remote_image(root, relative, max_bytes)
    path = safe_join(root, relative)
    try:
        if path.is_dir():
            raise ImageError("bad_image_path", f"{relative!r} is a directory")
        if not path.is_file():
            raise ImageError("missing_image", f"no file {relative!r} under {root}")
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(
                "oversized_image", f"{relative!r}: {size} bytes > max_bytes={max_bytes}"
            )
        return path.read_bytes()
    except OSError as exc:  # permissions, a name too long, I/O errors
        raise ImageError("unreadable_image", f"{relative!r}: {exc}") from None


# --------------------------------------------------------------------------- URLs

MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_USER_AGENT = "mllm-msr-ingest/0.1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_url(ref: str) -> bool:
    return "://" in ref


@dataclass(frozen=True)
class HostAllowlist:
    """Hosts an image URL may reach although their addresses are not public.

    ``names`` are host names as written in URLs (``images.internal``, ``localhost``): such a host
    is allowed whatever it resolves to. ``networks`` are IP networks (``127.0.0.1``,
    ``10.0.0.0/8``, ``fd00::/8``): a resolved address inside one of them is allowed.
    """

    names: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: list[str] | tuple[str, ...] | None) -> HostAllowlist:
        """Parse ``IngestConfig.http_allow_hosts``; a malformed entry is a :class:`ConfigError`."""
        names: set[str] = set()
        networks = []
        for entry in entries or ():
            text = str(entry).strip()
            try:
                networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = text.lower().rstrip(".")
            if not _HOSTNAME.fullmatch(name):
                raise ConfigError(
                    f"ingest.http_allow_hosts: {entry!r} is neither a host name nor an IP network"
                )
            names.add(name)
        return cls(frozenset(names), tuple(networks))

    def allows_address(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.networks if net.version == ip.version)


def _unmapped(ip: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` -> ``a.b.c.d`` (an IPv4-mapped IPv6 address is that IPv4 address)."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address (``"loopback"``, ``"private"``...), or None.

    IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry, and the IPv4 address
    inside 6to4, Teredo and NAT64 (64:ff9b::/96) addresses must be public too.
    """
    ip = _unmapped(ip)
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "non-global"
    if ip.version == 6:
        embedded = [ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        for inner in embedded:
            if inner is not None and (why := address_problem(inner)) is not None:
                return f"{why} ({inner} inside {ip})"
    return None


class _Deadline:
    """The overall deadline of one fetch: DNS, connects, TLS, redirects, retries and bodies.

    A per-read socket timeout does not bound a fetch (a server that drip-feeds one byte per
    second never trips it), so a timer thread shuts the current socket down when the time is
    up: any blocked read then returns at once, and :attr:`expired` tells the caller why.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sock = self._sock
        if sock is not None:
            _shutdown(sock)

    def arm(self, sock: socket.socket) -> None:
        """Make ``sock`` the socket to shut down when the deadline passes."""
        with self._lock:
            self._sock = sock
            expired = self.expired
        if expired:
            _shutdown(sock)

    def remaining(self, url: str) -> float:
        """Seconds left; raises ``fetch_timeout`` when there are none."""
        left = self.end - time.monotonic()
        if self.expired or left <= 0:
            raise self.error(url)
        return left

    def error(self, url: str, last: str = "") -> ImageError:
        detail = f"{url}: not fetched within http_deadline_s={self.seconds:g} s"
        return ImageError("fetch_timeout", detail + (f" (last error: {last})" if last else ""))

    def cancel(self) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown, also for an SSLSocket: it unblocks a pending read.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _resolve(host: str, port: int, deadline: _Deadline, url: str) -> list[IPAddress]:
    """The addresses of ``host`` (getaddrinfo in a thread, so that the deadline bounds DNS)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="mllm-msr-dns", daemon=True)
    thread.start()
    thread.join(deadline.remaining(url))
    if thread.is_alive():
        raise deadline.error(url, f"DNS lookup of {host}")
    if "error" in box:
        raise box["error"]
    addresses: list[IPAddress] = []
    for *_, sockaddr in box["infos"]:
        ip = ipaddress.ip_address(sockaddr[0])
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def _checked_addresses(
    host: str, port: int, allow: HostAllowlist, deadline: _Deadline, url: str
) -> list[IPAddress]:
    """Resolve ``host``; refuse it (``blocked_address``) if any address is not allowed."""
    addresses = _resolve(host, port, deadline, url)
    if host in allow.names:
        return addresses
    for ip in addresses:
        why = address_problem(ip)
        if why is not None and not allow.allows_address(_unmapped(ip)):
            raise ImageError(
                "blocked_address",
                f"{url}: {host} resolves to {ip} ({why}); name it in ingest.http_allow_hosts "
                "to allow it",
            )
    return addresses


def _connect(
    addresses: list[IPAddress], port: int, timeout_s: float, deadline: _Deadline, url: str
) -> socket.socket:
    """A TCP connection to the first of the checked ``addresses`` that answers."""
    last: OSError | None = None
    for ip in addresses:
        try:
            timeout = min(timeout_s, deadline.remaining(url))
            sock = socket.create_connection((str(ip), port), timeout=timeout)
        except OSError as exc:
            last = exc
            continue
        sock.settimeout(timeout_s)
        deadline.arm(sock)
        return sock
    raise last or OSError(f"no address to connect to for {url}")


class _HTTPConnection(http.client.HTTPConnection):
    """Connects to the addresses that were checked (no second DNS lookup: no rebinding)."""

    def __init__(self, host, port, addresses, timeout_s, deadline, url) -> None:
        super().__init__(host, port, timeout=timeout_s)
        self._pinned = (addresses, timeout_s, deadline, url)

    def connect(self) -> None:
        addresses, timeout_s, deadline, url = self._pinned
        self.sock = _connect(addresses, self.port, timeout_s, deadline, url)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, addresses, timeout_s, deadline, url) -> None:
        super().__init__(host, port, timeout=timeout_s, context=ssl.create_default_context())
        self._pinned = (addresses, timeout_s, deadline, url)

    def connect(self) -> None:
        addresses, timeout_s, deadline, url = self._pinned
        sock = _connect(addresses, self.port, timeout_s, deadline, url)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        deadline.arm(self.sock)


class _Retry(Exception):
    """A failure worth another attempt (HTTP 5xx)."""


def _split(url: str) -> tuple[str, str, int, str]:
    """``(scheme, ascii host, port, request target)`` of an http(s) URL, or ``bad_url``."""
    try:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").rstrip(".")
        if scheme not in ("http", "https") or not host:
            raise ValueError("not an http(s) URL with a host")
        port = parts.port or (443 if scheme == "https" else 80)
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except (ValueError, UnicodeError) as exc:
        raise ImageError("bad_url", f"{url[:200]!r}: {exc}") from None
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return scheme, host, port, urllib.parse.quote(target, safe="!#$%&'()*+,/:;=?@[]~")


def _fetch_once(
    url: str, timeout_s: float, max_bytes: int, allow: HostAllowlist, deadline: _Deadline
) -> bytes:
    """One attempt: follow at most :data:`MAX_REDIRECTS` redirects, checking every hop."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, target = _split(current)
        addresses = _checked_addresses(host, port, allow, deadline, current)
        cls = _HTTPSConnection if scheme == "https" else _HTTPConnection
        conn = cls(host, port, addresses, timeout_s, deadline, current)
        try:
            conn.request("GET", target, headers={"User-Agent": _USER_AGENT})
            resp = conn.getresponse()
            location = resp.getheader("Location")
            if resp.status in _REDIRECT_STATUSES and location:
                current = urllib.parse.urljoin(current, location.strip())
                continue
            if resp.status >= 500:
                raise _Retry(f"HTTP {resp.status} for {current}")
            if not 200 <= resp.status < 300:
                raise ImageError("http_error", f"HTTP {resp.status} for {current}")
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageError(
                    "oversized_image", f"{current}: Content-Length {length} > {max_bytes}"
                )
            chunks, size = [], 0
            while chunk := resp.read(min(64 * 1024, max_bytes + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ImageError("oversized_image", f"{current}: more than {max_bytes} bytes")
                deadline.remaining(current)
            deadline.remaining(current)  # a read cut by the deadline looks like an early EOF
            if isinstance(resp.length, int) and resp.length > 0:
                raise http.client.IncompleteRead(b"", resp.length)
            return b"".join(chunks)
        finally:
            conn.close()
    raise ImageError("http_error", f"{url}: more than {MAX_REDIRECTS} redirects")


def fetch_url(
    url: str,
    *,
    timeout_s: float,
    retries: int,
    max_bytes: int,
    backoff_s: float = 0.2,
    deadline_s: float = 30.0,
    allow: HostAllowlist | list[str] | None = None,
) -> bytes:
    """GET ``url`` with timeouts, at most ``retries`` retries, a size limit and address checks.

    ``timeout_s`` bounds each connect and socket read; ``deadline_s`` bounds the whole fetch
    (DNS, connects, redirects, retries, backoff and body): past it the fetch is cut and fails
    with ``fetch_timeout``. HTTP 4xx answers are final (no retry); timeouts, connection errors
    and 5xx are retried with exponential backoff (``fetch_failed`` once they are used up).

    Only http and https are accepted (also after a redirect); TLS certificates are verified.
    The host name is resolved and every address it resolves to must be public unicast: a
    loopback, private, link-local, multicast, reserved, unspecified... target (also one reached
    through a redirect, or an IPv4-mapped IPv6 address of one) is refused with
    ``blocked_address`` unless ``allow`` (:class:`HostAllowlist`, or the raw
    ``http_allow_hosts`` list) names the host or the address. The connection goes to the
    checked addresses (no second lookup); environment proxies are not used.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise ImageError("bad_url", f"not an http(s) URL: {url[:200]!r}")
    if not isinstance(allow, HostAllowlist):
        allow = HostAllowlist.parse(allow)
    deadline = _Deadline(deadline_s)
    last = ""
    try:
        for attempt in range(retries + 1):
            if attempt:
                pause = backoff_s * 2 ** (attempt - 1)
                if pause >= deadline.end - time.monotonic():
                    raise deadline.error(url, last)
                time.sleep(pause)
            try:
                return _fetch_once(url, timeout_s, max_bytes, allow, deadline)
            except ImageError:
                raise
            except _Retry as exc:
                last = str(exc)
            except ValueError as exc:  # http.client.InvalidURL (spaces...), a bad IPv6 literal
                raise ImageError("bad_url", f"{exc}: {url[:200]!r}") from None
            except (OSError, http.client.HTTPException) as exc:
                if deadline.expired:
                    raise deadline.error(url, last) from None
                last = f"{type(exc).__name__}: {exc} ({url})"
    finally:
        deadline.cancel()
    raise ImageError("fetch_failed", f"after {retries + 1} attempts: {last}")
