"""Small compatibility shims, applied only where they are needed.

torchvision: PyPI's torchvision wheels reachable for CPU-only torch are CUDA builds whose compiled
extension fails to register its ops, so `import torchvision` dies with
"operator torchvision::nms does not exist". diffusers and torch-fidelity import torchvision at load.
Declaring the two op schemas that torchvision's Python side looks up at import time lets the import
succeed; only torchvision's compiled detection ops stay unusable (dtr-scale never calls them). On a
machine where torchvision's extension loads (any consistent GPU install) the ops already exist and
this shim does nothing.
"""

from __future__ import annotations

import importlib.util

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keep the Library object alive: dropping it unregisters the schemas


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def ensure_torchvision_importable() -> bool:
    """Make `import torchvision` work on a CPU torch; returns True if the shim was applied."""
    global _library
    if importlib.util.find_spec("torchvision") is None or _library is not None:
        return False
    try:
        import torchvision  # noqa: F401

        return False
    except RuntimeError as err:
        if "does not exist" not in str(err):
            raise
    import sys

    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    missing = [name for name in _SCHEMAS if not _op_exists(name)]
    _library = torch.library.Library("torchvision", "DEF")
    for name in missing:
        _library.define(_SCHEMAS[name])
    import torchvision  # noqa: F401,F811

    return True
