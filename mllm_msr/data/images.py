"""Image validation and normalization, safe paths, bounded HTTP fetches.

Every image that enters the run directory goes through :func:`normalize_image`: decoded and
verified with Pillow, refused when the file is too large (``max_bytes``) or when its declared
size exceeds ``max_pixels`` (a decompression bomb: the check happens on the header, before any
pixel is decoded), converted to RGB, resized so that its longest side is at most ``max_side``,
re-encoded (JPEG or PNG) and hashed (sha256 of the normalized bytes).

Failures raise :class:`ImageError` whose ``reason`` is the short code written to
``quarantine/`` (:data:`REASONS`).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from mllm_msr.config import ImageConfig

REASONS = (
    "missing_image",  # the file does not exist
    "oversized_image",  # more bytes than ImageConfig.max_bytes
    "decompression_bomb",  # more pixels than ImageConfig.max_pixels
    "corrupt_image",  # Pillow cannot identify, verify or decode it
    "path_escape",  # a manifest path that leaves the dataset root
    "bad_image_path",  # empty, ".", NUL, a directory: names no file under the root
    "unreadable_image",  # the file exists but reading it fails (permissions, I/O error)
    "bad_url",  # not an http(s) URL
    "http_error",  # an HTTP status >= 400 (404 ...)
    "fetch_failed",  # timeouts / connection errors after the retries
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


def read_image_file(root: str | os.PathLike, relative: str, max_bytes: int) -> bytes:
    """Read an image file under ``root`` (size-checked before reading)."""
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


def is_url(ref: str) -> bool:
    return "://" in ref


def fetch_url(
    url: str, *, timeout_s: float, retries: int, max_bytes: int, backoff_s: float = 0.2
) -> bytes:
    """GET ``url`` with a timeout, at most ``retries`` retries and a size limit.

    HTTP 4xx answers are final (no retry); timeouts, connection errors and 5xx are retried with
    exponential backoff. Only http and https are accepted; TLS certificates are verified.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise ImageError("bad_url", f"not an http(s) URL: {url[:200]!r}")
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "mllm-msr-ingest/0.1"})
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > max_bytes:
                    raise ImageError(
                        "oversized_image", f"{url}: Content-Length {length} > {max_bytes}"
                    )
                data = resp.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise ImageError("oversized_image", f"{url}: more than {max_bytes} bytes")
                return data
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code} for {url}"
            if exc.code < 500:
                raise ImageError("http_error", last) from None
        except ImageError:
            raise
        except ValueError as exc:  # http.client.InvalidURL (spaces...), a bad IPv6 literal
            raise ImageError("bad_url", f"{exc}: {url[:200]!r}") from None
        except (TimeoutError, urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc} ({url})"
    raise ImageError("fetch_failed", f"after {retries + 1} attempts: {last}")
