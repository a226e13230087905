"""In-loop samples are drawn by every rank and assembled in order on rank 0: the same images at world 1 and 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distributed import run_ranks
from test_train_distributed import train_args

from dtr_scale.data.images import to_uint8_nhwc

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = r"""
import sys, torch
from dtr_scale.config import load_config
from dtr_scale.train.engine import Trainer
from dtr_scale.train.inloop import ema_sampler, sharded_images
out = sys.argv[1]
cfg = load_config(sys.argv[2], sys.argv[3:])
tr = Trainer(cfg)
model = tr.engine.module.model
g = torch.Generator().manual_seed(123)  # the same non-trivial weights on every rank, whatever the world
weights = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
calls = []
def gather(dst=0):
    calls.append(dst)
    return weights
tr.ema.gather = gather
labels = [3, 1, 4, 1, 5, 9, 2]  # 7 samples: uneven shares at world 2
ema = ema_sampler(tr.ema, tr.cfg, tr.manifest, tr.device, tr.rank, tr.world)
images = sharded_images(ema, labels, steps=3, cfg_scale=2.0, seed=7, batch_size=2)
assert calls == [None], calls  # every rank holds the EMA model and samples its share
if tr.rank == 0:
    torch.save(images, out)
else:
    assert images is None
if tr.world == 1:  # the same model through `dtr-scale sample`'s code, for the one-sampling-path check
    from dtr_scale.models.model_dir import data_section, make_config
    from dtr_scale.sample.sampler import sample_to_dir
    model.load_state_dict(weights, strict=False)  # pos_embed is a fixed buffer, not among the EMA weights
    d = cfg.diffusion
    config = make_config(model, data_section(tr.manifest), diffusion={"noise_schedule": d.noise_schedule,
                         "diffusion_steps": d.diffusion_steps, "learn_sigma": cfg.model.learn_sigma})
    sample_to_dir(model, out + ".sampler", config=config, num_samples=len(labels), batch_size=3, steps=3,
                  sampler="ddim", cfg_scale=2.0, seed=7, classes=labels, weights="model", device="cpu",
                  log=lambda m: None)
from distributed import leave
leave()  # not through interpreter exit while gloo threads still release tensors (tests/distributed.py)
"""


def test_in_loop_samples_are_sharded_and_equal_to_a_single_process(tmp_path, builtin_data):
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.pt"
        args = train_args(tmp_path / f"run{world}", builtin_data["train"])
        run_ranks(["-c", SCRIPT, str(out), *args[4:]], world_size=world)
        results[world] = torch.load(out, weights_only=True)
    assert results[1].shape[0] == 7
    # equal up to float rounding: a rank's batches hold other samples (matmul blocking differs)
    torch.testing.assert_close(results[2], results[1], rtol=0, atol=1e-5)
    # the samples differ from one another (labels and noise matter), so a shuffled assembly would show
    assert (results[1][0] - results[1][1]).abs().max() > 1e-3

    # One sampling path: sample i of the in-loop grid (seed 7, labels L) is sample i of `dtr-scale sample --seed 7
    # --classes L` with the same model, steps and guidance (the same label-then-noise stream per index).
    in_loop = to_uint8_nhwc(results[1])
    if in_loop.shape[-1] == 1:
        in_loop = np.repeat(in_loop, 3, axis=-1)
    with np.load(tmp_path / "world1.pt.sampler" / "samples.npz") as npz:
        sampled = npz["arr_0"]
    assert sampled.shape == in_loop.shape, (sampled.shape, in_loop.shape)
    # equal but for a rounding at a .5 boundary (the two draw in batches of 2 and 3)
    assert np.abs(sampled.astype(int) - in_loop.astype(int)).max() <= 1
