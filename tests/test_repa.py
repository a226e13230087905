"""REPA (representation alignment) and the transformers LR schedule: formulas against float64 hand computations,
where gradients go, the encoder's tokens, stop_step, and kill-and-resume at ZeRO-2/3 on two processes.

Encoders are tiny DINOv2 models built from `transformers` configs with random weights and saved with
`save_pretrained` (nothing is downloaded).
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
from dtr_scale.config import ConfigError, RunConfig
from dtr_scale.models.dit import DiT
from dtr_scale.models.repa import build_projector, match_token_grid, repa_loss
from dtr_scale.repa_encoder import RepaEncoder
from dtr_scale.train.repa import repa_active
from dtr_scale.train.step import TrainModule

ensure_torchvision_importable()


def tiny_dinov2(directory: Path, registers: int = 0) -> Path:
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                  patch_size=4)  # fmt: skip
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kwargs, num_register_tokens=registers))
    else:
        model = Dinov2Model(Dinov2Config(**kwargs))
    model.save_pretrained(directory)
    return directory


def test_loss_equals_a_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    projected, features = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    p, f = projected.double().numpy(), features.double().numpy()
    per_sample = []
    for b in range(3):
        cosines = [p[b, n] @ f[b, n] / (np.linalg.norm(p[b, n]) * np.linalg.norm(f[b, n])) for n in range(5)]
        per_sample.append(-np.mean(cosines))
    assert repa_loss(projected, features).item() == pytest.approx(np.mean(per_sample), abs=1e-6)
    assert repa_loss(features, features).item() == pytest.approx(-1.0, abs=1e-6)


def test_projector_is_repas_three_layer_silu_mlp():
    projector = build_projector(32, 64, 16)
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [tuple(m.weight.shape) for m in projector if isinstance(m, torch.nn.Linear)] == [
        (64, 32),
        (64, 64),
        (16, 64),
    ]
    assert all(torch.count_nonzero(m.bias) == 0 for m in projector if isinstance(m, torch.nn.Linear))


def test_grid_matching_is_identity_on_equal_grids_and_pil_bilinear_otherwise():
    from PIL import Image

    features = torch.randn(1, 16, 2)
    assert match_token_grid(features, 16) is features
    resized = match_token_grid(features, 4)  # 4x4 -> 2x2
    for channel in range(2):
        image = Image.fromarray(features[0, :, channel].reshape(4, 4).numpy().astype(np.float32), mode="F")
        expected = np.asarray(image.resize((2, 2), Image.BILINEAR)).reshape(4)
        np.testing.assert_allclose(resized[0, :, channel].numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="square grids"):
        match_token_grid(torch.randn(1, 12, 2), 4)


class ZeroBalancer(torch.nn.Module):
    """Zeroes the diffusion objective, so only REPA's term sends gradients."""

    def forward(self, means, counts):
        return means.sum() * 0.0


def test_gradient_reaches_only_the_blocks_up_to_depth_through_repa():
    from dtr_scale.diffusion import create_diffusion

    torch.manual_seed(0)
    model = DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10
    )
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    module = TrainModule(
        model, ZeroBalancer(), create_diffusion(""), 1.0, build_projector(32, 64, 24), 2, 0.5
    )
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([3, 300, 600, 999]), torch.tensor([0, 1, 2, 3])
    out = module(x, t, y, torch.randn_like(x), torch.zeros(4, dtype=torch.long), torch.tensor([4.0]),
                 torch.randn(4, 16, 24))  # fmt: skip
    out["loss"].backward()
    assert out["loss"].item() == pytest.approx(0.5 * out["repa"].item(), rel=1e-6)

    def touched(module_: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module_.parameters())

    assert touched(model.blocks[0]) and touched(model.blocks[1]) and touched(model.x_embedder)
    assert not touched(model.blocks[2]) and not touched(model.final_layer)
    assert touched(module.repa_projector)


def test_dit_returns_the_tokens_after_block_d_on_request_and_an_unchanged_output():
    torch.manual_seed(0)
    model = DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10
    ).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 7])
    with torch.no_grad():
        out, hidden = model(x, t, y, return_hidden_at=2)
        # By hand: the embeddings, then the first two blocks with each sample's routing mask.
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        for block in model.blocks[:2]:
            h = block(h, c, model.routing_mask(t, h.dtype))
        assert hidden.shape == (2, 16, 32) and torch.equal(hidden, h)
        assert torch.equal(out, model(x, t, y))  # the default return is the output alone
        for outside in (0, 4):
            with pytest.raises(ValueError, match=rf"return_hidden_at={outside}: expected a block in 1..3"):
                model(x, t, y, return_hidden_at=outside)


@pytest.mark.parametrize("registers", [0, 4])
def test_encoder_gives_the_patch_tokens_of_the_dit_grid(tmp_path, registers):
    from transformers import AutoModel

    directory = tiny_dinov2(tmp_path / "enc", registers)
    encoder = RepaEncoder(directory, dit_grid=4)  # 4x4 DiT tokens -> 16 px input
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    tokens = encoder(images)
    assert encoder.resolution == 16 and tokens.shape == (2, 16, 32)
    # By hand: [0, 1], three channels, ImageNet mean/std (no resize needed at 16 px), patch tokens only.
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    pixels = (((images + 1) / 2).expand(-1, 3, -1, -1) - mean) / std
    reference = AutoModel.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state[:, 1 + registers :]
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_an_encoder_that_does_not_return_its_patch_grid_is_refused(tmp_path):
    encoder = RepaEncoder(tiny_dinov2(tmp_path / "enc"), dit_grid=4)
    encoder.num_tokens = 25  # as if the model dropped (masked) patches: 17 tokens for a 5 x 5 grid
    with pytest.raises(ConfigError, match=r"repa.encoder: .* gave 17 tokens .* expected 25 patch tokens"):
        encoder(torch.zeros(1, 1, 16, 16))


def test_log_sums_split_the_objective_into_diffusion_and_repa_terms():
    from dtr_scale.train.step import LogSums

    sums = LogSums(torch.device("cpu"), repa_coeff=0.5)
    finite = torch.tensor(True)
    # objective = diffusion + 0.5 x repa: (0.15 - 0.4) and (0.25 - 0.3); the second window half has no REPA.
    sums.add(torch.tensor(-0.25), torch.zeros(2), finite, torch.tensor(-0.8))
    sums.add(torch.tensor(-0.05), torch.zeros(2), finite, torch.tensor(-0.6))
    sums.add(torch.tensor(0.2), torch.zeros(2), finite)
    out = sums.read()
    assert out["loss/repa"] == pytest.approx(-0.7)
    assert out["loss/diffusion"] == pytest.approx((0.15 + 0.25 + 0.2) / 3)
    term = 0.5 * (-1.4) / 3
    assert out["loss/repa_share"] == pytest.approx(abs(term) / (abs(term) + 0.2))


def test_missing_encoder_is_one_line_naming_the_key_and_path(tmp_path):
    with pytest.raises(
        ConfigError, match=rf"repa.encoder: {tmp_path / 'nowhere'} is not a local transformers"
    ):
        RepaEncoder(tmp_path / "nowhere", dit_grid=4)


def test_stop_step_switches_alignment_off_exactly():
    cfg = RunConfig()
    cfg.repa.encoder, cfg.repa.stop_step = "enc", 4
    assert [repa_active(cfg, s) for s in range(6)] == [True] * 4 + [False] * 2
    cfg.repa.stop_step = 0
    assert all(repa_active(cfg, s) for s in (0, 10**6))
    cfg.repa.encoder = None
    assert not repa_active(cfg, 0)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_follows_the_closed_forms(schedule):
    from dtr_scale.train.build import lr_scheduler

    cfg = RunConfig()
    cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.lr = schedule, 4, 20, 0.01
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    scheduler = lr_scheduler(cfg, optimizer)
    got = []
    for _ in range(20):
        got.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    for s, lr in enumerate(got):
        if s < 4:
            factor = s / 4
        else:
            progress = (s - 4) / 16
            factor = {
                "constant": 1.0,
                "linear": 1 - progress,
                "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
            }[schedule]
        assert lr == pytest.approx(0.01 * factor, abs=1e-12), (s, schedule)


# ------------------------------------------------------------------------------- precomputed features


@pytest.fixture(scope="module")
def repa_shards(tmp_path_factory) -> dict[str, Path]:
    """An image folder encoded by a tiny AutoencoderKL with REPA features of a tiny DINOv2 (64 px -> 4x8x8
    latents; 16 px encoder input = 4 x 4 patch tokens, the DiT-*/2 token grid)."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from dtr_scale.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("repa")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / "images" / name).mkdir(parents=True)
        for k in range(4):
            pixels = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{k}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)  # fmt: skip
    vae.save_pretrained(root / "vae")
    encoder = tiny_dinov2(root / "enc")
    preprocess(root / "images", root / "vae", root / "shards", image_size=64, shard_size=4, quiet=True,
               repa_encoder=encoder)  # fmt: skip
    return {"root": root, "manifest": root / "shards" / "manifest.json", "encoder": encoder}


def test_precomputed_features_equal_the_encoder_on_each_image_and_its_flip(repa_shards):
    from dtr_scale.data.image_folder import list_image_folder, load_image
    from dtr_scale.data.shards import decode_sample, iter_raw_samples, load_manifest

    manifest = load_manifest(repa_shards["manifest"])
    stored = manifest.extra["repa"]
    assert (stored["resolution"], stored["tokens"], stored["dim"]) == (16, 16, 32)  # 4 x 64 / 16 px
    assert stored["bytes_per_sample"] == 2 * 16 * 32 * 2
    paths, _, _ = list_image_folder(repa_shards["root"] / "images")
    encoder = RepaEncoder(repa_shards["encoder"], resolution=16)
    checked = 0
    for i in range(len(manifest.shards)):
        for raw in iter_raw_samples(manifest.shard_path(i)):
            sample = decode_sample(raw, tuple(manifest.latent_shape), repa_shape=(16, 32))
            image = load_image(repa_shards["root"] / "images" / paths[int(sample.key)], 64)
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
            expected = torch.stack([encoder(x)[0], encoder(x.flip(-1))[0]]).numpy()
            np.testing.assert_allclose(sample.repa.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
            checked += 1
    assert checked == 8


def test_stream_yields_the_features_of_each_latents_orientation(tmp_path):
    """Shards whose latents have std 0 and a distinct value per sample and orientation, carried by its REPA
    features too: every streamed latent must come with the features of its own orientation."""
    from dtr_scale.data.shards import LatentSample, write_manifest, write_shard
    from dtr_scale.data.stream import LatentStream

    samples = []
    for k in range(8):
        values = np.array([2 * k, 2 * k + 1], dtype=np.float16)  # as stored, flipped
        samples.append(LatentSample(key=f"{k:09d}", label=k % 2, mean=np.ones((2, 4, 2, 2), np.float16) * values[:, None, None, None],
                                    std=np.zeros((2, 4, 2, 2), np.float16), repa=np.ones((2, 3, 5), np.float16) * values[:, None, None]))  # fmt: skip
    records = [write_shard(tmp_path / f"shard-{i:06d}.tar", samples[4 * i : 4 * i + 4]) for i in range(2)]
    manifest = write_manifest(tmp_path, records, latent_shape=(4, 2, 2), scaling_factor=0.5, vae={"name": "x"},
                              image_size=16, labels=["a", "b"], extra={"repa": {"tokens": 3, "dim": 5}})  # fmt: skip
    stream = LatentStream(
        manifest, 4, seed=0, rank=0, world_size=1, hflip=True, resampled=False, with_repa=True
    )
    pairs = []
    for latents, labels, repa in stream:
        assert repa.shape == (len(labels), 3, 5) and repa.dtype == torch.float16
        pairs += [(float(z.flatten()[0]) / 0.5, float(f.flatten()[0])) for z, f in zip(latents, repa)]
    assert len(pairs) == 8 and all(z == f for z, f in pairs)
    assert {int(z) % 2 for z, _ in pairs} == {0, 1}  # both orientations were drawn


def test_features_of_another_encoder_are_refused_by_manifest_name(repa_shards, tmp_path):
    from dtr_scale.data.shards import load_manifest
    from dtr_scale.train.repa import _check_stored_features

    other = tiny_dinov2(tmp_path / "other")
    with torch.no_grad():  # same config, other weights
        from transformers import AutoModel

        model = AutoModel.from_pretrained(other)
        next(model.parameters()).add_(1.0)
        model.save_pretrained(other)
    manifest = load_manifest(repa_shards["manifest"])
    cfg = RunConfig()
    cfg.repa.encoder = str(other)
    with pytest.raises(ConfigError, match=rf"{manifest.path}: its precomputed REPA features.*weights_sha256"):
        _check_stored_features(cfg, manifest, manifest.extra["repa"])
    cfg.repa.encoder = str(repa_shards["encoder"])
    _check_stored_features(cfg, manifest, manifest.extra["repa"])  # the right one passes
    _check_stored_features(
        cfg, manifest, manifest.extra["repa"], grid=4
    )  # on the fly it would be 4 x 4 = 16 px too
    with pytest.raises(ConfigError, match=r"repa.resolution=null \(encoder input 32 px\)"):
        _check_stored_features(cfg, manifest, manifest.extra["repa"], grid=8)  # e.g. a DiT with an 8 x 8 grid
    cfg.repa.resolution = 32
    with pytest.raises(
        ConfigError, match=r"repa.resolution=32 \(encoder input 32 px\), but .* holds features at 16 px"
    ):
        _check_stored_features(cfg, manifest, manifest.extra["repa"])


def test_training_uses_the_stored_features_and_logs_the_repa_loss(repa_shards, tmp_path):
    from dtr_scale.data.shards import load_manifest
    from dtr_scale.train.repa import build_repa

    cfg = RunConfig()
    cfg.repa.encoder, cfg.repa.depth, cfg.repa.projector_dim = str(repa_shards["encoder"]), 1, 16
    model = DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=2
    )
    manifest = load_manifest(repa_shards["manifest"])
    projector, features = build_repa(cfg, model, manifest, torch.device("cpu"), torch.float32, False, {})
    stored = torch.randn(2, 16, 32, dtype=torch.float16)
    assert torch.equal(
        features(torch.zeros(2, 4, 8, 8), stored), stored
    )  # no encoder run: the shards' features
    assert projector[-1].out_features == 32

    metrics = train_tiny_repa(
        tmp_path / "run", "demo-cpu.yaml", repa_shards["manifest"], repa_shards["encoder"], 3
    )
    assert len(metrics) == 3 and all(-1.0 <= m["loss/repa"] <= 1.0 for m in metrics)


def train_tiny_repa(run_dir: Path, config: str, shards, encoder, steps: int, *overrides: str) -> list[dict]:
    """`dtr-scale train` of a 2-block, 32-wide DiT with REPA at depth 1 for `steps` steps, in a subprocess
    (configs/CONFIG, one process); returns its metrics.jsonl records."""
    from distributed import REPO, launcher_env

    command = [sys.executable, "-m", "dtr_scale", "train", "--config", str(REPO / "configs" / config),
               f"run_dir={run_dir}", f"data.shards={shards}", "model.hidden_size=32", "model.depth=2",
               "model.num_heads=2", "train.global_batch_size=4", f"train.max_steps={steps}", "train.log_every=1",
               "monitor.sample_every=0", "eval.every=0", "monitor.progress=false", "monitor.tensorboard=false",
               "data.num_workers=0", f"repa.encoder={encoder}", "repa.depth=1", "repa.projector_dim=16",
               "mtl.method=none", "mtl.num_clusters=1", *overrides]  # fmt: skip
    done = subprocess.run(command, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- two processes


@pytest.mark.multiprocess
@pytest.mark.minutes  # six two-process runs, ~1.5 min per stage: `make test-slow` (CI runs it)
@pytest.mark.parametrize(("zero_stage", "precision"), [(2, "fp32"), (3, "fp32"), (1, "bf16")])
def test_two_process_kill_and_resume_with_repa_equals_uninterrupted(
    tmp_path, builtin_data, zero_stage, precision
):
    from distributed import run_ranks
    from test_train_distributed import final_weights, read_metrics, train_args

    encoder = tiny_dinov2(tmp_path / "enc")
    steps = [f"deepspeed.zero_stage={zero_stage}", f"train.precision={precision}", "train.max_steps=6", "train.checkpoint_every=3",
             f"repa.encoder={encoder}", "repa.depth=1", "repa.projector_dim=48", "repa.stop_step=5",
             "train.lr_schedule=cosine", "train.warmup_steps=2"]  # fmt: skip
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_ranks(train_args(straight, builtin_data["train"], *steps))
    run_ranks(train_args(crashed, builtin_data["train"], *steps, hooks=True),
              env={"DTR_TEST_KILL_AFTER_STEP": "4"}, expect_kill=True)  # fmt: skip
    out = run_ranks(train_args(crashed, builtin_data["train"], *steps))
    assert "at step 3" in out[0].stdout
    a, b = read_metrics(straight), read_metrics(crashed)
    # stop_step=5: the steps taken at step counts 0..4 align, i.e. logged steps 1..5; step 6 does not.
    assert [("loss/repa" in m) for m in a] == [True] * 5 + [False]
    for ma, mb in zip(a, b):
        for key in ("loss/objective", "loss/repa", "lr"):
            assert ma.get(key) == mb.get(key), (ma["step"], key)
    assert -1.0 <= a[0]["loss/repa"] <= 1.0
    wa, wb = final_weights(straight, "step00000006"), final_weights(crashed, "step00000006")
    assert any(k.startswith("repa_projector.") for k in wa)  # the projector is checkpointed and resumed
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    from dtr_scale.sample.convert import convert_checkpoint

    converted = convert_checkpoint(straight, tmp_path / "model")
    assert not any("repa" in k for k in json.loads((converted / "config.json").read_text())["model"])
