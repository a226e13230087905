"""Every image mode Pillow opens becomes the right 8-bit RGB picture, or is refused by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtr_scale.data.image_folder import load_image
from dtr_scale.data.images import UnsupportedImage, open_rgb8


def _img(array: np.ndarray, mode: str) -> Image.Image:
    """An image of `mode` holding `array` (H, W[, bands]) as its raw pixel bytes."""
    return Image.frombytes(mode, (array.shape[1], array.shape[0]), np.ascontiguousarray(array).tobytes())


def _save(tmp_path: Path, name: str, image: Image.Image) -> Path:
    path = tmp_path / name
    image.save(path)
    return path


def test_16_bit_grayscale_png_maps_the_full_range_onto_8_bits(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # /257: 0, 1, 128, 255
    path = _save(tmp_path, "deep.png", _img(values, "I;16"))
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")  # what Pillow reports for a 16-bit PNG
    rgb = open_rgb8(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255] and (rgb == rgb[..., :1]).all()


def test_32_bit_integer_and_float_images(tmp_path: Path) -> None:
    ints = _save(tmp_path, "i.tif", _img(np.array([[0, 65535]], dtype=np.int32), "I"))
    assert open_rgb8(ints)[0, :, 1].tolist() == [0, 255]
    too_big = _save(tmp_path, "big.tif", _img(np.array([[0, 70000]], dtype=np.int32), "I"))
    with pytest.raises(UnsupportedImage, match=r"big\.tif: 32-bit integer image with values 0\.\.70000"):
        open_rgb8(too_big)
    floats = _save(tmp_path, "f.tif", _img(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F"))
    assert open_rgb8(floats)[0, :, 2].tolist() == [0, 128, 255]  # rint(127.5) = 128
    hdr = _save(tmp_path, "hdr.tif", _img(np.array([[0.0, 2.0]], dtype=np.float32), "F"))
    with pytest.raises(
        UnsupportedImage, match=r"hdr\.tif: floating-point image with values outside \[0, 1\]"
    ):
        open_rgb8(hdr)


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    la = np.array([[[0, 0], [0, 255], [100, 255]]], dtype=np.uint8)  # transparent black, opaque black, grey
    assert open_rgb8(_save(tmp_path, "la.png", _img(la, "LA")))[0, :, 0].tolist() == [255, 0, 100]
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], dtype=np.uint8)
    out = open_rgb8(_save(tmp_path, "rgba.png", _img(rgba, "RGBA"))).astype(int)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    # half-transparent blue over white: 255 * (1 - 128/255) = 127 in R and G, 255 in B
    assert np.abs(out[0, 2] - [127, 127, 255]).max() <= 1
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 255, 0] + [255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 (green) is transparent
    path = tmp_path / "p.png"
    palette.save(path, transparency=0)
    assert open_rgb8(path)[0].tolist() == [[255, 255, 255], [255, 0, 0]]


def test_cmyk_bilevel_and_plain_modes(tmp_path: Path) -> None:
    cmyk = np.array([[[0, 0, 0, 0], [0, 255, 255, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    out = open_rgb8(_save(tmp_path, "c.tif", _img(cmyk, "CMYK")))
    assert out[0].tolist() == [[255, 255, 255], [255, 0, 0], [0, 0, 0]]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert open_rgb8(_save(tmp_path, "b.png", bilevel))[0, :, 0].tolist() == [0, 255]
    gray = np.array([[7, 200]], dtype=np.uint8)
    assert open_rgb8(_save(tmp_path, "l.png", _img(gray, "L")))[0, :, 1].tolist() == [7, 200]


def test_undecodable_files_are_reasons_that_name_the_path(tmp_path: Path, monkeypatch) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    truncated = _save(tmp_path, "cut.png", Image.fromarray(np.full((64, 64, 3), 9, np.uint8)))
    truncated.write_bytes(truncated.read_bytes()[:60])
    for path in (garbage, truncated, tmp_path / "missing.png"):
        reason = load_image(path, 8)
        assert reason.kind == "undecodable" and str(path) in reason.message
    big = _save(tmp_path, "bomb.png", Image.new("L", (300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 90,000 px > 2 x 1000: Pillow refuses it
    reason = load_image(big, 8)
    assert (
        reason.kind == "undecodable"
        and "bomb.png" in reason.message
        and "DecompressionBomb" in reason.message
    )
    hdr = _save(tmp_path, "hdr.tif", _img(np.array([[0.0, 3.0]], dtype=np.float32), "F"))
    reason = load_image(hdr, 8)
    assert reason.kind == "unsupported" and "hdr.tif: floating-point image" in reason.message


def test_preprocess_crop_of_a_16_bit_png_equals_that_of_its_8_bit_twin(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (40, 50), dtype=np.uint16)
    deep = _save(tmp_path, "deep.png", _img(eight * 257, "I;16"))
    plain = _save(tmp_path, "plain.png", _img(eight.astype(np.uint8), "L"))
    assert np.array_equal(load_image(deep, 32), load_image(plain, 32))
