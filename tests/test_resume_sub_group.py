"""A ZeRO-3 checkpoint resumed with another `deepspeed.sub_group_size` (the size of the optimizer's flat
sub-groups, which shapes its saved state) is refused in one line that names the key, the saved value and the
override that resumes it; resuming with that override works."""

from __future__ import annotations

import subprocess
import sys

import pytest
from distributed import free_port, rank_env
from test_train_distributed import train_args

pytestmark = [pytest.mark.minutes]  # three trainer starts, ~30 s on 2 cores


def _train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=rank_env(0, 1, free_port()), capture_output=True, text=True, timeout=300
    )


def test_zero3_resume_with_another_sub_group_size_names_the_key_and_the_override(tmp_path, builtin_data):
    run_dir = tmp_path / "run"
    common = ["deepspeed.zero_stage=3", "train.checkpoint_every=2"]
    first = _train(
        train_args(
            run_dir, builtin_data["train"], *common, "train.max_steps=2", "deepspeed.sub_group_size=1000"
        )
    )
    assert first.returncode == 0, first.stdout + first.stderr

    resumed = train_args(run_dir, builtin_data["train"], *common, "train.max_steps=3")
    refused = _train([*resumed, "deepspeed.sub_group_size=4000"])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, refused.stderr
    # the key, the saved and the new value, and the override that resumes, in one line (the generic resume check
    # of dtr_scale/train/resume.py; its ZeRO-3 twin in checkpoint.py covers checkpoints saved before the key)
    assert "deepspeed.sub_group_size 1000 -> 4000" in errors[0], errors
    assert "the overrides that resume: deepspeed.sub_group_size=1000)" in errors[0], errors

    again = _train([*resumed, "deepspeed.sub_group_size=1000"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "step00000003" in (run_dir / "checkpoints/latest").read_text()
