"""The input side of `dtr-scale preprocess`: an ImageFolder listed, and its images loaded center-cropped.

Layout: `INPUT/<class name>/<image>` (ImageNet's `train/<wnid>/*.JPEG`); classes are the sorted folder
names, images the sorted file names with one of `IMAGE_EXTENSIONS`. An image is decoded to faithful 8-bit
RGB (data/images.py) and ADM-center-cropped; one that cannot be used comes back as an `UnusableImage` (its
kind and a message naming the file), never as an exception, so one bad file never aborts an encode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtr_scale.data.images import UnsupportedImage, open_rgb8

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}


class UnreadableImageWarning(UserWarning):
    """Input images could not be used; they are skipped, counted and named once per shard and kind."""


@dataclass(frozen=True)
class UnusableImage:
    """Why an image cannot be used: kind "undecodable" (Pillow or the OS could not read it, including Pillow's
    decompression-bomb refusal) or "unsupported" (pixels with no faithful 8-bit RGB form), and the message,
    which names the file."""

    kind: str
    message: str


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """(relative image paths, class indices, class names) of an ImageFolder, in a deterministic order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist (expected INPUT/<class>/<image files>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(
            f"input folder {root} has no class sub-folders (expected INPUT/<class>/<image files>)"
        )
    paths, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(f"{name}/{file.name}")
                labels.append(index)
    if not paths:
        raise ValueError(f"input folder {root} has no images with extensions {sorted(IMAGE_EXTENSIONS)}")
    return paths, labels, classes


def center_crop(image, image_size: int) -> np.ndarray:
    """ADM's center crop: halve with a BOX filter while the short side is >= 2x the size, resize the short
    side to `image_size` with BICUBIC, then crop the center square. Returns uint8 (size, size, 3)."""
    from PIL import Image

    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - image_size) // 2, (pixels.shape[1] - image_size) // 2
    return pixels[top : top + image_size, left : left + image_size]


def load_image(path: Path, image_size: int) -> np.ndarray | UnusableImage:
    """Center-cropped uint8 HWC RGB image, or why it cannot be used (an UnusableImage naming the file).

    Any mode Pillow opens is turned into 8-bit RGB faithfully (data/images.py: 16-bit, float, alpha, CMYK
    ...); a file that cannot be opened or decoded for any reason Pillow or the OS gives (including Pillow's
    decompression-bomb refusal) is returned as a reason, never raised: one image never aborts a job.
    """
    from PIL import Image

    try:
        return center_crop(Image.fromarray(open_rgb8(path)), image_size)
    except UnsupportedImage as err:
        return UnusableImage("unsupported", str(err))
    except (OSError, ValueError) as err:
        return UnusableImage("undecodable", str(err))


class ImageList(torch.utils.data.Dataset):
    """Images of an ImageFolder as a Dataset, for a DataLoader's decoding workers.

    items: (image number, path relative to `root`, class index) per entry. Entry i is
    (number, path, label, uint8 (image_size, image_size, 3) RGB or an UnusableImage).
    """

    def __init__(self, root: Path, items: list[tuple[int, str, int]], image_size: int) -> None:
        self.root, self.items, self.image_size = root, items, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, str, int, np.ndarray | UnusableImage]:
        number, rel, label = self.items[i]
        return number, rel, label, load_image(self.root / rel, self.image_size)


def collate_as_list(batch: list) -> list:
    """A DataLoader batch of ImageList entries, left as the list of entries (no stacking)."""
    return batch  # images may be UnusableImage; the encoder loop sorts them out
