"""Image files -> 8-bit RGB arrays, for every mode Pillow opens, or a refusal that names the file.

`Image.convert("RGB")` is only right for 8-bit modes: a 16-bit grayscale PNG ("I;16", values 0..65535)
comes out clipped to white, 32-bit "I" likewise, and float "F" images are truncated. Here:

| mode                         | becomes                                                                  |
|------------------------------|--------------------------------------------------------------------------|
| 1, L, P (opaque), RGB        | Pillow's own conversion (exact for 8-bit data)                           |
| CMYK, YCbCr                  | Pillow's own conversion to RGB                                           |
| I;16, I;16L, I;16B, I;16N    | value / 257, rounded (65535 -> 255: the full 16-bit range onto 8 bits)   |
| I (32-bit int)               | as 16-bit (PNG and TIFF put 16-bit samples in "I"); values outside        |
|                              | 0..65535 are refused                                                     |
| F (32-bit float)             | value * 255, rounded, when every value is in [0, 1]; otherwise refused   |
| LA, PA, RGBA, P with alpha   | composited over a white background (how a viewer shows the picture)      |
| anything else (LAB, HSV ...) | refused                                                                  |

Grayscale results are repeated into three equal channels. Refusals raise `UnsupportedImage` naming the
path and mode; callers that must not abort (preprocess) count and skip such files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("LA", "PA", "RGBA", "La", "RGBa")
PILLOW_RGB_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "RGBX")


class UnsupportedImage(ValueError):
    """An image whose pixels cannot be turned into 8-bit RGB faithfully (message names the file and mode)."""


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def to_rgb8(image, where: str | os.PathLike = "image") -> np.ndarray:
    """A PIL image of any mode -> uint8 (H, W, 3) RGB per the module table; UnsupportedImage otherwise."""
    from PIL import Image

    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode in PILLOW_RGB_MODES:
        return np.asarray(image.convert("RGB"))
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImage(
                f"{where}: 32-bit integer image with values {values.min():.0f}..{values.max():.0f}, outside the "
                "16-bit range 0..65535 this reader maps onto 8 bits; convert it to 8 or 16 bits first"
            )
        return _gray_to_rgb(np.rint(values / 257.0).astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all() or (values.size and (values.min() < 0 or values.max() > 1)):
            raise UnsupportedImage(
                f"{where}: floating-point image with values outside [0, 1] (min {np.nanmin(values):.3g}, max "
                f"{np.nanmax(values):.3g}); there is no agreed way to map it onto 8 bits: convert it first"
            )
        return _gray_to_rgb(np.rint(values * 255.0).astype(np.uint8))
    raise UnsupportedImage(f"{where}: image mode {mode!r} is not supported (convert it to RGB first)")


def open_rgb8(path: str | os.PathLike) -> np.ndarray:
    """Open and fully decode an image file -> uint8 (H, W, 3) RGB.

    Raises UnsupportedImage for a mode with no faithful 8-bit form, and OSError (Pillow's own, or its
    DecompressionBombError / truncation errors) or ValueError for a file that cannot be decoded; every
    message names `path`.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb8(image, path)
    except UnsupportedImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise OSError(f"{path}: cannot decode this image ({type(err).__name__}: {err})") from err
    except Exception as err:  # a decoder plugin's own failure (struct.error, IndexError, ...): still one file
        raise OSError(f"{path}: cannot decode this image ({type(err).__name__}: {err})") from err


def quantize_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Floats in [-1, 1] -> uint8 [0, 255], same shape: the one quantiser of dtr-scale (samples, grids, FID
    references). As the reference DiT's sample.py: clamp(127.5 x + 128, 0, 255) truncated, i.e. 127.5 (x + 1)
    rounded half up; it inverts x = v / 127.5 - 1 exactly, also after a float16 round trip."""
    values = torch.as_tensor(images).detach().float().cpu()
    return torch.clamp(127.5 * values + 128.0, 0, 255).to(torch.uint8).numpy()


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> uint8 (N, H, W, C) by `quantize_uint8`."""
    return quantize_uint8(images).transpose(0, 2, 3, 1)
