"""bench/convergence.py end to end on a toy budget: the built-in digits, and a user's manifest + reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TOY = ["--widths", "32", "--seeds", "0", "--steps", "4", "--evals", "2", "--samples", "10", "--kid-samples",
       "4", "--reference-size", "10", "--sample-steps", "2", "--jobs", "1", "model.depth=1"]  # fmt: skip


def run(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench/convergence.py"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_builtin_digits_variants_give_records_table_and_plot(tmp_path):
    out = tmp_path / "bench"
    run("--out", str(out), "--variants", "vanilla", "dtr+ant-uw", *TOY)
    records = json.loads((out / "results.json").read_text())["records"]
    assert sorted((r["variant"], r["step"]) for r in records) == [
        ("dtr+ant-uw", 2), ("dtr+ant-uw", 4), ("vanilla", 2), ("vanilla", 4)]  # fmt: skip
    for r in records:
        assert r["kid_samples"] == 4 and 0 <= r["class_accuracy"] <= 1 and np.isfinite(r["kid"])
    assert (out / "convergence.png").stat().st_size > 1000
    table = (out / "table.md").read_text()
    assert "| vanilla |" in table and "| dtr+ant-uw |" in table
    (out / "table.md").unlink()
    run("--out", str(out), "--report-only")  # the table again, from the stored results alone
    assert (out / "table.md").read_text() == table


def test_a_users_manifest_and_reference_without_the_digit_judge(tmp_path, builtin_data):
    from dtr_scale.data.builtin import heldout_images

    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=heldout_images(Path(builtin_data["heldout"]), rgb=True)[:20])
    out = tmp_path / "bench"
    run("--out", str(out), "--variants", "min-snr", "--manifest", str(builtin_data["train"]),
        "--reference", str(reference), "--judge", "none", *TOY)  # fmt: skip
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["step"] for r in records] == [2, 4]
    assert all("class_accuracy" not in r and np.isfinite(r["kid"]) for r in records)


@pytest.mark.minutes  # four toy runs plus scoring (~1.5 min): `make test-slow`
def test_repa_variants_train_with_a_local_encoder_and_need_one(tmp_path):
    from test_repa import tiny_dinov2

    encoder = tiny_dinov2(tmp_path / "enc")
    out = tmp_path / "bench"
    run("--out", str(out), "--variants", "repa", "dtr+uw+repa", "--repa-encoder", str(encoder), *TOY)
    records = json.loads((out / "results.json").read_text())["records"]
    assert sorted({r["variant"] for r in records}) == ["dtr+uw+repa", "repa"]
    metrics = (out / "runs" / "repa_w32_s0" / "metrics.jsonl").read_text().splitlines()
    assert all("loss/repa" in json.loads(line) for line in metrics)  # the REPA term was trained
    refused = subprocess.run([sys.executable, str(REPO / "bench/convergence.py"), "--out", str(tmp_path / "x"),
                              "--variants", "repa", *TOY], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "need --repa-encoder DIR" in refused.stderr


@pytest.mark.minutes  # two toy runs plus scoring (~1 min): `make test-slow`
def test_objectives_are_a_dimension_and_flow_runs_sample_with_a_flow_sampler(tmp_path):
    out = tmp_path / "bench"
    run("--out", str(out), "--variants", "dtr", "--objectives", "ddpm", "flow", *TOY)
    records = json.loads((out / "results.json").read_text())["records"]
    assert sorted((r["variant"], r["objective"], r["step"]) for r in records) == [
        ("dtr", "ddpm", 2), ("dtr", "ddpm", 4), ("flow-dtr", "flow", 2), ("flow-dtr", "flow", 4)]  # fmt: skip
    config = (out / "runs" / "flow-dtr_w32_s0" / "config.yaml").read_text()
    assert "objective: flow" in config and "sampler: heun" in config
    table = (out / "table.md").read_text()
    assert "| flow-dtr |" in table and "| variant | 25% | 50% | 75% | 90% |" in table
    refused = subprocess.run([sys.executable, str(REPO / "bench/convergence.py"), "--out", str(tmp_path / "x"),
                              "--variants", "min-snr", "--objectives", "flow", *TOY], cwd=REPO, capture_output=True,
                             text=True)  # fmt: skip
    assert refused.returncode == 2 and "drop them with flow" in refused.stderr


def test_more_seeds_or_variants_continue_a_benchmark_and_other_settings_are_refused(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))  # bench/ scripts import their helpers as top-level modules
    from convergence import load_results, parse_args

    results = tmp_path / "results.json"
    first = parse_args(
        ["--out", str(tmp_path), "--variants", "vanilla", "--seeds", "0", "1", "--steps", "40"]
    )
    document = load_results(first, results)
    document["records"] = [{"variant": "vanilla", "width": 64, "seed": 0, "step": 40}]
    results.write_text(json.dumps(document))
    more = parse_args(
        ["--out", str(tmp_path), "--variants", "dtr", "--seeds", "2", "--steps", "40", "--jobs", "1"]
    )
    grown = load_results(more, results)
    assert grown["settings"]["seeds"] == [0, 1, 2] and grown["settings"]["variants"] == ["vanilla", "dtr"]
    assert grown["records"] == document["records"]  # nothing run is lost
    with pytest.raises(SystemExit, match="holds results of other settings"):
        load_results(parse_args(["--out", str(tmp_path), "--variants", "vanilla", "--steps", "80"]), results)


@pytest.mark.parametrize(
    "extra",
    [["--variants", "vanilla"], ["--repa-encoder", "enc", "--manifest", "m.json", "--reference", "r"]],
)
def test_precomputed_repa_features_need_an_encoder_and_the_built_in_digits(extra, capsys):
    sys.path.insert(0, str(REPO / "bench"))
    from convergence import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--repa-features", "precomputed", *extra])
    assert "--repa-features precomputed stores the --repa-encoder's targets" in capsys.readouterr().err
