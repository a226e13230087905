"""`convert --format diffusers`: DiTPipeline folders of routed and unrouted models (sample/diffusers_export.py).

Expectations are independent of the exporter: dtr-scale's own DiT forward (float64), its own sampler
(`dtr-scale sample`, the ADM/DiT DDIM), the schedule's closed form, and a fresh interpreter in which dtr_scale
cannot be imported at all.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_scale.compat import ensure_torchvision_importable
from dtr_scale.data.vae import vae_identity
from dtr_scale.diffusion.sampling import sample_generators
from dtr_scale.models import layers
from dtr_scale.models.dit import DiT
from dtr_scale.models.model_dir import make_config, save_model_dir
from dtr_scale.sample.diffusers_export import (
    build_scheduler,
    build_transformer,
    diffusers_dit_state,
    write_diffusers_folder,
)
from dtr_scale.sample.sampler import sample_to_dir

ensure_torchvision_importable()
from diffusers import AutoencoderKL, DiTPipeline  # noqa: E402

import dtr_scale.hf  # noqa: E402,F401  (registers the dtr-scale classes for from_pretrained)

ROUTING = {"alpha": 4.0, "beta": 0.5, "num_tasks": 1000}
# A large scaling factor keeps the random model's pixels inside [-1, 1] (no clamping hides a difference).
PIXEL_DATA = {
    "latent_shape": [4, 8, 8],
    "scaling_factor": 300.0,
    "vae": {"name": "builtin-pixel-unshuffle", "downscale_factor": 2},
    "image_size": 16,
    "labels": [f"digit {i}" for i in range(10)],
    "manifest": None,
}
SEED, CLASSES, CFG, STEPS = 5, [3, 0, 9, 3], 1.5, 10  # 10 divides 1000: the same DDIM timesteps in both


def tiny(routing=None, learn_sigma=True, seed=0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=learn_sigma, routing=routing)  # fmt: skip
    for p in model.parameters():  # adaLN-Zero left alone would make every output zero
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def diffusers_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """diffusers' DiT timestep features: exp(-ln(max_period) i / (half - 1)), cos first (downscale_freq_shift=1,
    flip_sin_to_cos=True), written out here by hand."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - 1))
    args = t[:, None].double() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 999, 37])
    y = torch.tensor([0, 3, 9, 10, 1, 2])  # 10 = our null label
    return x, t, y, torch.where(y == 10, torch.full_like(y, 1000), y)  # 1000 = DiTPipeline's null label


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("routing", [None, ROUTING], ids=["unrouted", "routed"])
def test_dtr_class_forward_equals_ours_in_float64(routing, learn_sigma):
    model = tiny(routing, learn_sigma)
    transformer = build_transformer(make_config(model, PIXEL_DATA), model.state_dict(), "dtr")
    assert type(transformer).__name__ == "DTRDiTTransformer2DModel"
    x, t, y, pipeline_y = inputs()
    with torch.no_grad():
        ours = model.double()(x, t, y)
        theirs = transformer.double()(x, timestep=t, class_labels=pipeline_y).sample
    assert theirs.shape == (6, 8 if learn_sigma else 4, 8, 8)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-12)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_native_class_is_our_forward_with_diffusers_timestep_frequencies(monkeypatch, learn_sigma):
    """Every weight maps exactly; the one difference is diffusers' timestep frequencies (i/127, not i/128)."""
    model = tiny(None, learn_sigma)
    transformer = build_transformer(make_config(model, PIXEL_DATA), model.state_dict(), "diffusers")
    assert type(transformer).__name__ == "DiTTransformer2DModel"
    x, t, y, pipeline_y = inputs()
    with torch.no_grad():
        theirs = transformer.double()(x, timestep=t, class_labels=pipeline_y).sample
        exact = model.double()(x, t, y)
        monkeypatch.setattr(
            layers.TimestepEmbedder, "timestep_embedding", staticmethod(diffusers_frequencies)
        )
        shifted = model(x, t, y)
    # diffusers computes its timestep features in float32 whatever the model dtype: 1e-7 apart, not 1e-16.
    torch.testing.assert_close(theirs, shifted, rtol=0, atol=1e-6)
    # ... and that difference is real: the reference frequencies give another output.
    assert (theirs - exact).abs().max() > 1e-3


def test_class_table_is_padded_so_that_label_1000_is_the_null_class():
    model = tiny()
    state = diffusers_dit_state(model.state_dict(), depth=2, num_classes=10)
    table = state["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"]
    ours = model.y_embedder.embedding_table.weight
    assert table.shape == (1001, 32)
    torch.testing.assert_close(table[:10], ours[:10], rtol=0, atol=0)
    torch.testing.assert_close(table[10:], ours[10:11].expand(991, -1), rtol=0, atol=0)


def test_dtr_class_refuses_a_label_that_is_neither_a_class_nor_null():
    transformer = build_transformer(make_config(tiny(ROUTING), PIXEL_DATA), tiny(ROUTING).state_dict(), "dtr")
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="class label 11 is out of range.*0..9"):
        transformer(x, timestep=torch.tensor([3]), class_labels=torch.tensor([11]))


def test_forcing_diffusers_class_on_a_routed_model_says_why():
    model = tiny(ROUTING)
    with pytest.raises(ValueError, match="DTR routing"):
        build_transformer(make_config(model, PIXEL_DATA), model.state_dict(), "diffusers")


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_scheduler_carries_the_runs_betas(kind):
    config = make_config(tiny(), PIXEL_DATA)  # linear schedule, 1000 steps (ADM: 1e-4 .. 0.02)
    scheduler = build_scheduler(config, kind)
    expected = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    np.testing.assert_allclose(scheduler.betas.double().numpy(), expected, rtol=1e-6)
    scheduler.set_timesteps(STEPS)
    assert scheduler.timesteps.tolist() == list(range(900, -1, -100))


def model_dir(tmp_path: Path, routing, learn_sigma=True, data=PIXEL_DATA) -> Path:
    model = tiny(routing, learn_sigma)
    return save_model_dir(tmp_path / "model", model.state_dict(), None, make_config(model, data))


def ours(model_path: Path, out: Path) -> np.ndarray:
    """`dtr-scale sample --sampler ddim`: float images in [0, 1], (N, H, W) (channel 0)."""
    sample_to_dir(model_path, out, num_samples=len(CLASSES), batch_size=4, steps=STEPS, sampler="ddim",
                  cfg_scale=CFG, weights="model", seed=SEED, classes=CLASSES, device="cpu", log=lambda _: None)  # fmt: skip
    with np.load(out / "samples.npz") as npz:
        return npz["arr_0"][..., 0].astype(np.float64) / 255.0


def pipeline_images(folder: Path) -> np.ndarray:
    """DiTPipeline on the same per-sample generators as `dtr-scale sample` (each past its label draw)."""
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generators, _ = sample_generators(SEED, list(range(len(CLASSES))), 10, CLASSES)
    out = pipe(class_labels=CLASSES, guidance_scale=CFG, generator=generators, num_inference_steps=STEPS,
               output_type="np")  # fmt: skip
    return np.asarray(out.images, dtype=np.float64)[..., 0]


def export(model_path: Path, out: Path, transformer_class="auto", **kwargs) -> Path:
    from safetensors.torch import load_file

    config = json.loads((model_path / "config.json").read_text())
    state = load_file(model_path / "model.safetensors")
    return write_diffusers_folder(out, config, state, transformer_class=transformer_class, **kwargs)


# dtr-scale quantises 127.5 x + 128 truncated; the pipeline returns x / 2 + 0.5 unquantised: <= 1/255 apart.
IMAGE_ATOL = 1 / 255 + 1e-4


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("routing", [ROUTING, None], ids=["routed", "unrouted-exact"])
def test_pipeline_draws_the_images_dtr_scale_sample_draws(tmp_path, routing, learn_sigma):
    path = model_dir(tmp_path, routing, learn_sigma)
    folder = export(path, tmp_path / "hf", transformer_class="dtr")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["dtr_scale.hf", "DTRDiTTransformer2DModel"]
    assert index["vae"] == ["dtr_scale.hf", "PixelShuffleVAE"]
    assert index["id2label"]["3"] == "digit 3"
    expected = ours(path, tmp_path / "ours")
    got = pipeline_images(folder)
    assert expected.std() > 0.05  # images, not a constant
    np.testing.assert_allclose(got, expected, rtol=0, atol=IMAGE_ATOL)


def test_native_pipeline_matches_our_sampler_with_diffusers_frequencies(tmp_path, monkeypatch):
    """With diffusers' own class the pipeline draws what dtr-scale draws once its timestep features use
    diffusers' frequencies (for this random model the exact images differ by under one grey level)."""
    path = model_dir(tmp_path, None)
    folder = export(path, tmp_path / "hf", transformer_class="diffusers")
    assert json.loads((folder / "model_index.json").read_text())["transformer"] == [
        "diffusers", "DiTTransformer2DModel",
    ]  # fmt: skip
    got = pipeline_images(folder)
    exact = ours(path, tmp_path / "exact")
    monkeypatch.setattr(layers.TimestepEmbedder, "timestep_embedding", staticmethod(diffusers_frequencies))
    shifted = ours(path, tmp_path / "shifted")
    np.testing.assert_allclose(got, shifted, rtol=0, atol=IMAGE_ATOL)
    np.testing.assert_allclose(got, exact, rtol=0, atol=2 / 255)


def tiny_vae(directory: Path, block_channels: int = 8) -> tuple[Path, dict]:
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(block_channels,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=block_channels, sample_size=8)  # fmt: skip
    vae.save_pretrained(directory)
    return directory, dict(vae.config)


def test_vae_the_run_did_not_record_is_refused_by_name(tmp_path):
    recorded, config = tiny_vae(tmp_path / "recorded")
    other, _ = tiny_vae(tmp_path / "other", block_channels=16)
    data = {**PIXEL_DATA, "latent_shape": [4, 8, 8], "image_size": 8, "scaling_factor": 0.5,
            "vae": vae_identity(recorded, config, name="tiny-vae")}  # fmt: skip
    path = model_dir(tmp_path, None, data=data)
    with pytest.raises(ValueError, match=rf"VAE {other} is not the one.*'tiny-vae'"):
        export(path, tmp_path / "hf", vae_dir=other)
    assert not (tmp_path / "hf").exists()  # nothing half written


NO_DTR_SCALE = r"""
import sys, importlib.abc, json
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dtr_scale" or name.startswith("dtr_scale."):
            raise ImportError("dtr_scale is blocked in this interpreter")
sys.meta_path.insert(0, Block())
import torch
try:  # a CPU torch with a CUDA torchvision wheel: declare the two op schemas torchvision looks up at import
    import torchvision  # noqa
except RuntimeError:
    for m in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[m]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
from diffusers import DiTPipeline
folder, out = sys.argv[1], sys.argv[2]
pipe = DiTPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
generators = [torch.Generator().manual_seed(i) for i in range(2)]
images = pipe(class_labels=[1, 7], guidance_scale=2.0, generator=generators, num_inference_steps=4, output_type="np").images
import numpy as np
np.save(out, np.asarray(images))
print(json.dumps({"dtr_scale_loaded": any(m.startswith("dtr_scale") for m in sys.modules)}))
"""


@pytest.mark.slow
def test_unrouted_folder_loads_where_dtr_scale_cannot_be_imported(tmp_path):
    recorded, config = tiny_vae(tmp_path / "vae")
    data = {**PIXEL_DATA, "image_size": 16, "scaling_factor": 0.5, "vae": vae_identity(recorded, config)}
    data["latent_shape"] = [4, 8, 8]
    path = model_dir(tmp_path, None, data=data)
    folder = export(path, tmp_path / "hf")  # auto: unrouted with an AutoencoderKL -> diffusers' own classes
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"] and index["vae"][0] == "diffusers"
    assert "noise prediction is" in (folder / "README.md").read_text()  # the measured drift, stated
    out = tmp_path / "images.npy"
    done = subprocess.run([sys.executable, "-c", NO_DTR_SCALE, str(folder), str(out)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"dtr_scale_loaded": False}
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    here = pipe(class_labels=[1, 7], guidance_scale=2.0, generator=generators, num_inference_steps=4,
                output_type="np").images  # fmt: skip
    fresh = np.load(out)
    assert fresh.shape == (2, 8, 8, 3)  # a one-level AutoencoderKL does not upsample
    np.testing.assert_allclose(fresh, np.asarray(here), rtol=0, atol=1e-6)


def test_model_card_reports_the_last_eval_figures_of_the_run(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from dtr_scale.sample.model_card import last_eval_figures

    writer = SummaryWriter(str(tmp_path / "run" / "tensorboard"))
    for step, kid in ((100, 0.5), (200, 0.25)):
        writer.add_scalar("eval/kid", kid, step)
        writer.add_scalar("loss/mean", 1.0 / step, step)
    writer.close()
    assert last_eval_figures(tmp_path / "run") == {"eval/kid": (200, 0.25)}
    path = model_dir(tmp_path, ROUTING)
    config = json.loads((path / "config.json").read_text())
    from safetensors.torch import load_file

    folder = write_diffusers_folder(
        tmp_path / "hf", config, load_file(path / "model.safetensors"),
        card={"run_dir": str(tmp_path / "run"), "command": ["dtr-scale", "convert", "r", "--out", "my folder"]},
    )  # fmt: skip
    card = (folder / "README.md").read_text()
    assert "- `eval/kid` = 0.25 (step 200)" in card
    assert "dtr-scale convert r --out 'my folder'" in card
    assert "import dtr_scale.hf" in card


def test_auto_uses_the_exact_class_where_the_folder_needs_dtr_scale_anyway():
    model = tiny(None)
    transformer = build_transformer(make_config(model, PIXEL_DATA), model.state_dict(), "auto")
    assert type(transformer).__name__ == "DTRDiTTransformer2DModel"  # the pixel codec comes from dtr_scale.hf
