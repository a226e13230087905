"""The output folder of `dtr-scale sample`: one PNG per sample index, samples.json, samples.npz.

    DIR/%06d.png     sample i, uint8 RGB (written under a temporary name and renamed: never half-written)
    DIR/samples.json the settings that made them ("complete": false until samples.npz exists)
    DIR/samples.npz  `arr_0` uint8 NHWC with 3 channels (the ADM evaluator's convention), `arr_1` int64
                     labels

A folder written with other settings (IDENTITY_KEYS) is refused rather than resumed into.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dtr_scale.fileio import atomic_path, atomic_write_text
from dtr_scale.sample.seeds import sample_label

NPZ_NAME = "samples.npz"
JSON_NAME = "samples.json"
FORMAT_NAME = "dtr-scale-samples"
# Settings that decide what image index i is: a resumed run must use the same ones.
IDENTITY_KEYS = ("model_step", "model_tag", "sampler", "steps", "cfg_scale", "guidance_channels", "weights")
IDENTITY_KEYS += ("seed", "classes", "image_shape")


def png_path(out_dir: Path, index: int) -> Path:
    """DIR/%06d.png of sample `index`."""
    return out_dir / f"{index:06d}.png"


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 1 or 3) image as PNG atomically (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(tmp, format="PNG")


def _read_png_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        array = np.asarray(img)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]


def check_resume(out_dir: Path, settings: dict[str, Any]) -> None:
    """ValueError, naming the differences, if `out_dir` holds a samples.json made with other IDENTITY_KEYS
    (or an unreadable one); nothing if it holds none."""
    path = out_dir / JSON_NAME
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); remove it or choose another --out") from err
    changed = {k: (previous.get(k), settings[k]) for k in IDENTITY_KEYS if previous.get(k) != settings[k]}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{out_dir} holds samples made with other settings ({detail}); resuming would mix them. "
            "Use another --out or the same settings."
        )


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write `document` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def assemble(out_dir: Path, settings: dict[str, Any], classes: list[int] | None, num_classes: int) -> None:
    """Rank 0, after every rank finished: samples.npz from the PNGs, then samples.json with complete=True.

    RuntimeError naming the missing indices if any of the settings' `count` PNGs is absent.
    """
    count, seed = settings["count"], settings["seed"]
    missing = [i for i in range(count) if not png_path(out_dir, i).is_file()]
    if missing:
        raise RuntimeError(
            f"{out_dir}: {len(missing)} of {count} PNGs are missing after sampling (first {missing[:5]}); "
            "did a rank fail, or do the ranks not share this directory?"
        )
    images = np.stack([_read_png_rgb(png_path(out_dir, i)) for i in range(count)])
    labels = np.array([sample_label(seed, i, classes, num_classes) for i in range(count)], dtype=np.int64)
    with atomic_path(out_dir / NPZ_NAME) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, arr_0=images, arr_1=labels)
    write_json(out_dir / JSON_NAME, {**settings, "complete": True, "npz": NPZ_NAME})
