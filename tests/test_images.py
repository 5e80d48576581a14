"""Image normalization, decompression-bomb and size limits, safe paths."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from PIL import Image

from mllm_msr.config import ImageConfig
from mllm_msr.data.images import (
    ImageError,
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
