"""Specification of the DiT with DTR routing (DESIGN §3; reference: facebookresearch/DiT models.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dtr_scale.models.dit import DiT, DiT_models, DiTBlock, get_2d_sincos_pos_embed
from dtr_scale.models.routing import dtr_mask_table

NUM_TASKS = 1000


def tiny_dit(routing=None, seed: int = 0, **kwargs) -> DiT:
    """8x8 latents, patch 2 (16 tokens), hidden 32 (beta 0.8 -> 25 active channels), 2 blocks."""
    torch.manual_seed(seed)
    config = dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10
    )
    config.update(kwargs)
    return DiT(routing=routing, **config)


def perturb_zero_init(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give the adaLN-Zero layers (zero at init) random values so that every block does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def tiny_inputs(batch: int = 4, seed: int = 2, t=None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 999, 600, 300][:batch]) if t is None else t
    y = torch.randint(0, 10, (batch,), generator=generator)
    return x, t, y


def routed_pair(beta: float) -> tuple[DiT, DiT]:
    """A plain DiT and a routed one with identical (perturbed) weights, both in eval mode."""
    plain = tiny_dit()
    perturb_zero_init(plain)
    routed = tiny_dit(routing={"alpha": 4.0, "beta": beta, "num_tasks": NUM_TASKS})
    routed.load_state_dict(plain.state_dict(), strict=True)
    return plain.eval(), routed.eval()


# ---------------------------------------------------------------- state dict and sizes


def reference_keys(depth: int) -> set[str]:
    """State-dict keys of the reference DiT (facebookresearch/DiT models.py)."""
    keys = {
        "pos_embed",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    for n in range(depth):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{n}.{layer}.weight", f"blocks.{n}.{layer}.bias"}
    return keys


def test_state_dict_keys_are_the_reference_dit_keys():
    model = tiny_dit(routing={"beta": 0.8, "num_tasks": NUM_TASKS})
    assert set(model.state_dict()) == reference_keys(depth=2)


def test_state_dict_shapes_follow_the_reference_layout():
    state = tiny_dit().state_dict()
    # hidden 32, patch 2, 4 latent channels, learned sigma -> 8 output channels, 10 classes + null.
    assert state["x_embedder.proj.weight"].shape == (32, 4, 2, 2)
    assert state["pos_embed"].shape == (1, 16, 32)
    assert state["t_embedder.mlp.0.weight"].shape == (32, 256)
    assert state["y_embedder.embedding_table.weight"].shape == (11, 32)
    assert state["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert state["blocks.0.mlp.fc1.weight"].shape == (128, 32)
    assert state["blocks.0.adaLN_modulation.1.weight"].shape == (192, 32)
    assert state["final_layer.linear.weight"].shape == (2 * 2 * 8, 32)
    assert state["final_layer.adaLN_modulation.1.weight"].shape == (64, 32)


def test_mask_table_is_one_shared_buffer_outside_the_state_dict():
    model = tiny_dit(routing={"beta": 0.8, "num_tasks": NUM_TASKS})
    assert "mask_table" not in model.state_dict()
    mask_buffers = [name for name, buffer in model.named_buffers() if buffer.dtype == torch.bool]
    assert mask_buffers == ["mask_table"]
    assert torch.equal(model.mask_table, dtr_mask_table(NUM_TASKS, 32, alpha=4.0, beta=0.8))


def test_plain_checkpoint_loads_strictly_into_a_routed_model():
    plain = tiny_dit()
    routed = tiny_dit(routing={"beta": 0.8, "num_tasks": NUM_TASKS}, seed=5)
    routed.load_state_dict(plain.state_dict(), strict=True)  # no missing or unexpected key
    # and the routed model keeps its own table: the checkpoint carries none to overwrite it with
    assert torch.equal(routed.mask_table, dtr_mask_table(NUM_TASKS, 32, alpha=4.0, beta=0.8))


def test_pos_embed_is_fixed_and_not_trained():
    model = tiny_dit()
    assert "pos_embed" not in dict(model.named_parameters())
    assert torch.equal(model.pos_embed, torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float().unsqueeze(0))


def test_2d_sincos_pos_embed_encodes_column_then_row():
    # D = 8: each half (4 values) is [sin(p w0), sin(p w1), cos(p w0), cos(p w1)] with w = [1, 1/100].
    # As in the reference (meshgrid(w, h)), the first half encodes the column, the second the row;
    # token n sits at row n // G, column n % G.
    emb = get_2d_sincos_pos_embed(8, 2)
    assert emb.shape == (4, 8)

    def half(p: float) -> list[float]:
        return [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]

    assert np.allclose(emb[0], half(0) + half(0))
    assert np.allclose(emb[1], half(1) + half(0))  # row 0, column 1
    assert np.allclose(emb[2], half(0) + half(1))  # row 1, column 0
    assert np.allclose(emb[3], half(1) + half(1))


def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies():
    from dtr_scale.models.dit import TimestepEmbedder

    # dim 4: half = 2 frequencies exp(-ln(1e4) * [0, 1] / 2) = [1, 1/100]
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 3.0]), 4)
    expected = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0], [math.cos(3), math.cos(0.03), math.sin(3), math.sin(0.03)]]
    )
    torch.testing.assert_close(emb, expected)


REFERENCE_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def test_dit_models_has_the_twelve_reference_configurations():
    expected = {f"DiT-{size}/{patch}" for size in REFERENCE_SIZES for patch in (2, 4, 8)}
    assert set(DiT_models) == expected


@pytest.mark.parametrize("name", sorted({f"DiT-{s}/{p}" for s in REFERENCE_SIZES for p in (2, 4, 8)}))
def test_dit_models_sizes_match_the_reference(name):
    size, patch = name[len("DiT-") :].split("/")
    hidden, depth, heads = REFERENCE_SIZES[size]
    with torch.device("meta"):  # no memory for XL
        model = DiT_models[name]()
    assert model.x_embedder.proj.out_channels == hidden
    assert model.x_embedder.proj.kernel_size == (int(patch), int(patch))
    assert len(model.blocks) == depth
    assert model.num_heads == heads
    assert model.pos_embed.shape == (1, (32 // int(patch)) ** 2, hidden)


def test_dit_xl2_parameter_count_matches_the_reference():
    # The reference train.py prints "DiT Parameters: 675,129,632" for DiT-XL/2 (pos_embed counted,
    # as it is an nn.Parameter there and a buffer here).
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    count = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    assert count == 675_129_632


# ---------------------------------------------------------------- initialisation and labels


def test_adaln_zero_init_gives_zero_output():
    model = tiny_dit(routing={"beta": 0.8, "num_tasks": NUM_TASKS}).eval()
    x, t, y = tiny_inputs()
    out = model(x, t, y)
    assert out.shape == (4, 8, 8, 8)  # learned sigma doubles the channels
    assert torch.equal(out, torch.zeros_like(out))


def test_without_learned_sigma_output_has_the_input_channels():
    model = tiny_dit(learn_sigma=False).eval()
    x, t, y = tiny_inputs()
    assert model(x, t, y).shape == x.shape


def test_forced_label_drop_uses_the_null_class():
    model = tiny_dit()
    labels = torch.tensor([3, 7])
    dropped = model.y_embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0]))
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(dropped, table[torch.tensor([10, 7])])


def test_label_dropout_only_in_training():
    model = tiny_dit(class_dropout_prob=0.5)
    labels = torch.arange(10).repeat(20)
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(model.y_embedder(labels, train=False), table[labels])
    torch.manual_seed(0)
    dropped = (model.y_embedder(labels, train=True) == table[10]).all(dim=1)
    assert 0.3 < dropped.float().mean() < 0.7


def test_no_null_class_without_label_dropout():
    assert tiny_dit(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10


# ---------------------------------------------------------------- DTR placement in the block


def block_and_inputs(seed: int = 0):
    torch.manual_seed(seed)
    block = DiTBlock(32, 4)
    with torch.no_grad():
        block.adaLN_modulation[-1].weight.normal_(0, 0.1)
        block.adaLN_modulation[-1].bias.normal_(0, 0.1)
    x = torch.randn(2, 5, 32)
    c = torch.randn(2, 32)
    table = dtr_mask_table(NUM_TASKS, 32, beta=0.8)
    mask = table[torch.tensor([0, 999])].unsqueeze(1).float()  # (B, 1, C), different windows
    return block, x, c, mask


def dtr_block_by_the_formula(block: DiTBlock, x, c, m, layer_norm):
    # DESIGN §3: h = m*x; h = h + g1*attn(mod(norm1(h))); h = h + g2*mlp(mod(norm2(h))); out = h + (1-m)*x
    s1, sc1, g1, s2, sc2, g2 = (v.unsqueeze(1) for v in block.adaLN_modulation(c).chunk(6, dim=1))
    h = m * x
    h = h + g1 * block.attn(layer_norm(h) * (1 + sc1) + s1)
    h = h + g2 * block.mlp(layer_norm(h) * (1 + sc2) + s2)
    return h + (1 - m) * x


def test_block_with_mask_follows_the_dtr_placement_bitwise():
    block, x, c, m = block_and_inputs()
    assert torch.equal(block(x, c, m), dtr_block_by_the_formula(block, x, c, m, block.norm1))


def test_block_layer_norm_covers_all_channels_zeros_included():
    block, x, c, m = block_and_inputs()

    def layer_norm(v):  # over all C channels, the zeros of the inactive ones included; no affine
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-6)

    expected = dtr_block_by_the_formula(block, x, c, m, layer_norm)
    torch.testing.assert_close(block(x, c, m), expected, rtol=1e-5, atol=1e-5)


def test_block_does_not_read_inactive_channels():
    # Changing x on channels outside the window changes the output on exactly those channels, by
    # exactly that amount: the attention and MLP never see them, only the skip path carries them.
    block, x, c, m = block_and_inputs()
    delta = torch.randn_like(x) * (1 - m)
    out, out_shifted = block(x, c, m), block(x + delta, c, m)
    active = m.expand_as(x).bool()
    assert torch.equal(out_shifted[active], out[active])
    torch.testing.assert_close(out_shifted - out, delta, rtol=0, atol=1e-6)


def test_block_updates_reach_inactive_channels_too():
    # The residual updates are not masked (official TaskRouter: out = block(m*x) + (1-m)*x), so the
    # output on inactive channels is x plus the update, not x itself.
    block, x, c, m = block_and_inputs()
    inactive = ~m.expand_as(x).bool()
    assert not torch.allclose(block(x, c, m)[inactive], x[inactive])


def test_block_with_all_ones_mask_equals_plain_block():
    block, x, c, _ = block_and_inputs()
    ones = torch.ones(2, 1, 32)
    assert torch.equal(block(x, c, ones), block(x, c))


# ---------------------------------------------------------------- routed DiT behaviour


def test_beta_one_is_exactly_plain_dit():
    plain, routed = routed_pair(beta=1.0)
    assert routed.mask_table is None
    x, t, y = tiny_inputs()
    assert torch.equal(routed(x, t, y), plain(x, t, y))


def test_no_routing_and_beta_one_build_the_same_model():
    x, t, y = tiny_inputs()
    plain = tiny_dit(seed=3)
    routed = tiny_dit(routing={"beta": 1.0, "num_tasks": NUM_TASKS}, seed=3)
    perturb_zero_init(plain)
    perturb_zero_init(routed)
    assert torch.equal(plain.eval()(x, t, y), routed.eval()(x, t, y))


def test_beta_below_one_changes_the_output():
    plain, routed = routed_pair(beta=0.8)
    x, t, y = tiny_inputs()
    out_plain, out_routed = plain(x, t, y), routed(x, t, y)
    assert torch.isfinite(out_routed).all()
    assert not torch.allclose(out_routed, out_plain, atol=1e-4)


def test_routing_mask_is_the_table_row_of_each_sample_timestep():
    _, routed = routed_pair(beta=0.8)
    t = torch.tensor([0, 999, 600, 300])
    mask = routed.routing_mask(t, torch.float32)
    assert mask.shape == (4, 1, 32) and mask.dtype == torch.float32
    assert torch.equal(mask[:, 0].bool(), dtr_mask_table(NUM_TASKS, 32, beta=0.8)[t])


def test_each_sample_in_a_mixed_timestep_batch_uses_its_own_mask():
    _, routed = routed_pair(beta=0.8)
    x, t, y = tiny_inputs(t=torch.tensor([0, 999, 600, 300]))
    batched = routed(x, t, y)
    for i in range(4):
        alone = routed(x[i : i + 1], t[i : i + 1], y[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_mask_row_depends_on_timestep_not_on_batch_position():
    # Same sample under two timesteps with different windows gives two different outputs, and the
    # result of the pair does not depend on their order in the batch.
    _, routed = routed_pair(beta=0.8)
    x, _, y = tiny_inputs(batch=1)
    xs, ys = x.repeat(2, 1, 1, 1), y.repeat(2)
    forward = routed(xs, torch.tensor([10, 990]), ys)
    reverse = routed(xs, torch.tensor([990, 10]), ys)
    torch.testing.assert_close(forward, reverse.flip(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad_t", [1000, -1])
def test_timestep_outside_the_table_is_rejected(bad_t):
    # e.g. a respaced sampler passing its own step index beyond the original 1000 steps
    model = tiny_dit(routing={"beta": 0.8, "num_tasks": NUM_TASKS}).eval()
    x, _, y = tiny_inputs(batch=2)
    with pytest.raises(ValueError, match="timestep index out of range.*1000 tasks"):
        model(x, torch.tensor([5, bad_t]), y)


def test_float_timesteps_index_the_nearest_row():
    _, routed = routed_pair(beta=0.8)
    x, _, y = tiny_inputs(batch=2)
    torch.testing.assert_close(
        routed(x, torch.tensor([600.0, 300.0]), y), routed(x, torch.tensor([600, 300]), y)
    )
    # Off-grid floats: 679.6 -> 680 and 772.4 -> 772. The window start moves from 1 to 2 at t = 680 and from
    # 2 to 3 at t = 773 (C = 32, beta 0.8), so truncation (679) and ceiling (773) would pick other windows.
    table = dtr_mask_table(NUM_TASKS, 32, beta=0.8)
    assert window_start(table[679]) == 1 and window_start(table[680]) == 2
    assert window_start(table[772]) == 2 and window_start(table[773]) == 3
    mask = routed.routing_mask(torch.tensor([679.6, 772.4]), torch.float32)
    assert torch.equal(mask[:, 0].bool(), table[torch.tensor([680, 772])])


def window_start(row: torch.Tensor) -> int:
    return int(row.int().argmax())


def test_gradient_reaches_every_parameter_through_routed_blocks():
    model = tiny_dit(routing={"beta": 0.8, "num_tasks": NUM_TASKS}, class_dropout_prob=0.0)
    x, t, y = tiny_inputs()
    model(x, t, y).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # at init some are exactly zero

    model.zero_grad(set_to_none=True)
    perturb_zero_init(model)
    model(x, t, y).square().mean().backward()
    zero = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert zero == []


def test_activation_checkpointing_gives_the_same_gradients():
    routing = {"beta": 0.8, "num_tasks": NUM_TASKS}
    x, t, y = tiny_inputs()
    grads = []
    for grad_checkpointing in (False, True):
        model = tiny_dit(routing=routing, class_dropout_prob=0.0, grad_checkpointing=grad_checkpointing)
        perturb_zero_init(model)
        model.train()
        model(x, t, y).square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- classifier-free guidance


def cfg_batch(routed: DiT):
    x, t, y = tiny_inputs()
    x = torch.cat([x[:2], x[:2]])  # the sampler feeds the same latents twice
    t = torch.cat([t[:2], t[:2]])
    y = torch.cat([y[:2], torch.full((2,), routed.num_classes)])  # second half: null class
    return x, t, y


def test_cfg_scale_one_returns_the_conditional_prediction():
    _, routed = routed_pair(beta=0.8)
    x, t, y = cfg_batch(routed)
    raw = routed(x, t, y)
    out = routed.forward_with_cfg(x, t, y, cfg_scale=1.0)
    torch.testing.assert_close(out[:2, :4], raw[:2, :4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2:, :4], raw[:2, :4], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[:, 4:], raw[:, 4:])  # learned variance is never guided


def test_cfg_guides_all_latent_channels_by_default():
    _, routed = routed_pair(beta=0.8)
    x, t, y = cfg_batch(routed)
    raw = routed(x, t, y)
    out = routed.forward_with_cfg(x, t, y, cfg_scale=4.0)
    guided = raw[2:, :4] + 4.0 * (raw[:2, :4] - raw[2:, :4])
    torch.testing.assert_close(out[:2, :4], guided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2:, :4], guided, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 4:], raw[:, 4:])


def test_cfg_with_three_guidance_channels_reproduces_the_reference_sampler():
    _, routed = routed_pair(beta=0.8)
    routed.guidance_channels = 3
    x, t, y = cfg_batch(routed)
    raw = routed(x, t, y)
    out = routed.forward_with_cfg(x, t, y, cfg_scale=4.0)
    guided = raw[2:, :3] + 4.0 * (raw[:2, :3] - raw[2:, :3])
    torch.testing.assert_close(out[:2, :3], guided, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 3:], raw[:, 3:])  # channel 3 and the variance pass through unguided


def test_guidance_channels_outside_the_latent_channels_are_rejected():
    with pytest.raises(ValueError, match="guidance_channels"):
        tiny_dit(guidance_channels=5)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.minutes  # a cold torch.compile: ~1 min on 2 cores
def test_compiled_routed_dit_s8_matches_eager():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=16, routing={"beta": 0.8, "num_tasks": NUM_TASKS}).eval()
    perturb_zero_init(model, std=0.02)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    t, y = torch.tensor([3, 900]), torch.tensor([1, 500])
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: the routing lookup must not break the graph
    with torch.no_grad():
        eager = model(x, t, y)
        out = compiled(x, t, y)
    assert eager.abs().max() > 1e-3  # a real, non-zero prediction is being compared
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
