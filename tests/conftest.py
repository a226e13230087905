import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory) -> dict[str, Path]:
    """The built-in MNIST latent shards ({"train", "heldout"} manifest paths), written once per session."""
    from dtr_scale.data.builtin import prepare_builtin

    return prepare_builtin(tmp_path_factory.mktemp("builtin"))
