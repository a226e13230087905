"""bench/convergence_report.py: docs/convergence.md from hand-made results files (seed means, crossings, budget)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import convergence_report  # noqa: E402


def record(variant: str, seed: int, step: int, acc: float, kid: float, objective: str = "flow") -> dict:
    return {"variant": variant, "objective": objective, "width": 32, "seed": seed, "step": step, "kid": kid,
            "class_accuracy": acc, "class_accuracy_cfg1.5": acc / 2, "train_seconds": 10.0 * step}  # fmt: skip


def test_report_has_each_benchmarks_budget_seed_spread_and_crossings(tmp_path):
    # flow-vanilla: seed means 0.20 at step 2, 0.55 at step 4 (0.5 and 0.6); flow-repa: 0.30 then 0.80
    records = [record("flow-vanilla", 0, 2, 0.2, 0.3), record("flow-vanilla", 1, 2, 0.2, 0.3),
               record("flow-vanilla", 0, 4, 0.5, 0.2), record("flow-vanilla", 1, 4, 0.6, 0.2),
               record("flow-repa", 0, 2, 0.3, 0.25), record("flow-repa", 0, 4, 0.8, 0.1)]  # fmt: skip
    settings = {"steps": 4, "evals": 2, "cfg_scale": 3.0, "extra_cfg_scales": [1.5], "samples": 10,
                "kid_samples": 4, "reference_size": 10, "sample_steps": 2, "flow_sampler": "euler",
                "repa_encoder": "runs/enc", "overrides": ["repa.projector_dim=256"]}  # fmt: skip
    document = {"records": records, "settings": settings, "command": "python bench/convergence.py ...",
                "machine": {"cpus": 2, "torch": "2.13.0+cpu", "threads_per_run": 1}, "date": "2026-12-05"}  # fmt: skip
    results = tmp_path / "convergence-toy.json"
    results.write_text(json.dumps(document))
    out = tmp_path / "docs" / "convergence.md"
    assert convergence_report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## convergence-toy" in text
    assert "- date: 2026-12-05" in text and "2 CPUs, torch 2.13.0+cpu, 1 thread(s) per run" in text
    assert "flow-repa (width 32): [0]; flow-vanilla (width 32): [0, 1]" in text
    assert "CFG 3.0, 1.5" in text and "euler 2 steps (flow)" in text and "`repa.projector_dim=256`" in text
    assert "| flow-vanilla | 20.0% [20, 20] | 55.0% [50, 60] |" in text  # seed mean [min, max]
    # first scored step whose seed mean reaches 25 / 50 / 75 / 90%
    assert "| flow-vanilla | 4 | 4 | - | - |" in text and "| flow-repa | 2 | 4 | 4 | - |" in text
    assert (tmp_path / "docs" / "convergence-toy.png").stat().st_size > 1000


def test_a_file_that_is_not_a_results_file_is_one_line(tmp_path):
    bad = tmp_path / "convergence-bad.json"
    bad.write_text("[]")
    with pytest.raises(SystemExit, match=r"convergence-bad.json: not a bench/convergence.py results file"):
        convergence_report.main(["--results", str(bad), "--out", str(tmp_path / "r.md")])
