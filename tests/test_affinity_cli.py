"""`dtr-scale affinity` on a model dir + shards, then `dtr-scale cluster --objective affinity` on its output."""

from __future__ import annotations

import json

import numpy as np
import torch

from dtr_scale.cli import main
from dtr_scale.data.shards import load_manifest
from dtr_scale.models.dit import DiT
from dtr_scale.models.model_dir import data_section, make_config, save_model_dir


def test_affinity_matrix_from_a_model_dir_clusters_into_contiguous_intervals(tmp_path, builtin_data, capsys):
    torch.manual_seed(0)
    model = DiT(input_size=16, patch_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                num_classes=10, routing={"alpha": 4.0, "beta": 0.8, "num_tasks": 1000})  # fmt: skip
    for p in model.parameters():  # leave adaLN-Zero so every group has a gradient
        torch.nn.init.normal_(p, std=0.05)
    data = data_section(load_manifest(builtin_data["train"]))
    model_dir = save_model_dir(
        tmp_path / "model", model.state_dict(), model.state_dict(), make_config(model, data)
    )

    affinity = tmp_path / "affinity.npy"
    assert main(["affinity", "--model", str(model_dir), "--data", str(builtin_data["train"]), "--group-size", "250",
                 "--batches", "1", "--batch-size", "8", "--device", "cpu", "--out", str(affinity)]) == 0  # fmt: skip
    matrix = np.load(affinity, allow_pickle=False)
    assert matrix.shape == (4, 4)  # 1000 timesteps in groups of 250
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)  # cosine similarity of a group with itself
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    assert np.all(np.abs(matrix) <= 1 + 1e-6) and not np.allclose(matrix, 1.0)

    clusters = tmp_path / "clusters.json"
    assert main(["cluster", "--objective", "affinity", "--affinity", str(affinity), "--k", "2",
                 "--out", str(clusters)]) == 0  # fmt: skip
    intervals = json.loads(clusters.read_text())["intervals"]

    # Brute force over the 3 ways to cut the 4 groups in two (DESIGN §5 affinity cost of [l, r]:
    # -sum_{t=l..r} A[c, t] with c = floor((l + r + 1) / 2)), then groups -> timesteps (250 each).
    def cost(left: int, right: int) -> float:
        return -float(matrix[(left + right + 1) // 2, left : right + 1].sum())

    totals = {cut: cost(0, cut - 1) + cost(cut, 3) for cut in (1, 2, 3)}
    best = min(totals, key=totals.get)
    assert sorted(totals.values())[1] - totals[best] > 1e-6  # a unique optimum: the check is meaningful
    assert intervals == [[0, 250 * best - 1], [250 * best, 999]]
    capsys.readouterr()
