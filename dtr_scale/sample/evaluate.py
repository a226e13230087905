"""`dtr-scale evaluate`: FID, KID, precision/recall (and IS where possible) of a sample npz, offline.

    dtr-scale evaluate --samples DIR/samples.npz --reference REF [--out metrics.json]
                       [--inception-weights FILE] [--batch-size 50] [--kid-subset-size 1000]

REF: a folder of images, an npz of images (`arr_0` uint8 NHWC), or an ADM reference batch / statistics npz
(`mu`, `sigma`). The metrics and their sources: dtr_scale/metrics.py; the offline Inception weights:
dtr_scale/inception.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dtr_scale.metrics import compute_metrics

# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI of `dtr-scale evaluate`."""
    parser.add_argument("--samples", required=True, help="samples npz (arr_0 uint8 NHWC) or an image folder")
    parser.add_argument("--reference", required=True, help="image folder, images npz, or ADM statistics npz")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--inception-weights", default=None, help="torch-fidelity Inception state dict file")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (torch-fidelity)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def run(args: argparse.Namespace) -> int:
    """`dtr-scale evaluate`: print (and with --out write) the metrics JSON; returns 0."""
    result = compute_metrics(
        args.samples,
        args.reference,
        inception_weights=args.inception_weights,
        batch_size=args.batch_size,
        kid_subset_size=args.kid_subset_size,
        device=args.device,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0
