"""Diffusion Transformer (Peebles & Xie, 2023) with Denoising Task Routing in every block.

Architecture, initialisation and state-dict key names follow the reference DiT (facebookresearch/DiT
models.py), so reference checkpoints load and converted checkpoints export to it. The model is plain
PyTorch: it knows nothing of DeepSpeed, data or logging. Routing is a fixed table looked up per
sample from the timestep, passed explicitly to each block (no module-global state), which keeps
torch.compile, activation checkpointing and ZeRO-3 working.
"""

from __future__ import annotations

import contextlib

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from dtr_scale.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
)
from dtr_scale.models.routing import DTRConfig, dtr_mask_table


class DiTBlock(nn.Module):
    """adaLN-Zero block. With a DTR mask m (B, 1, C) the attention and MLP read only the active
    channels; the inactive ones reach the output through the skip path (DTR, Sec. 3.2, as the
    official TaskRouter implements it):
        h = m*x; h = h + g1*attn(mod(norm1(h))); h = h + g2*mlp(mod(norm2(h))); out = h + (1-m)*x
    The residual updates are not masked, so inactive channels still receive them. LayerNorm
    normalises over all C channels, zeros included; the conditioning c is not masked.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One adaLN-Zero block on tokens x (B, N, C) conditioned on c (B, C); `mask` (B, 1, C) is DTR's
        channel window (None: all channels)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        h = x if mask is None else mask * x
        h = h + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift_msa, scale_msa))
        h = h + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))
        if mask is None:
            return h
        # out = h + (1-m)*x as one fused kernel: bitwise the same (the product by a 0/1 factor is exact)
        # and one full-size pass fewer forward, which keeps DTR's step-time overhead small.
        return torch.addcmul(h, 1 - mask, x)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to patch * patch * out_channels per token (DiT)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens, (B, C) condition -> (B, N, p*p*out_channels)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _gathered(params: list[nn.Parameter]):
    """A context in which ZeRO-3-partitioned `params` are whole (rank 0's edits kept); a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone and optional DTR routing.

    routing: None (plain DiT) or a DTRConfig / dict(alpha, beta, num_tasks). beta = 1 is plain DiT.
    guidance_channels: latent channels that classifier-free guidance applies to; None = all
    (DTR's choice); 3 reproduces the reference DiT's sampling behaviour.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        routing: DTRConfig | dict | None = None,
        guidance_channels: int | None = None,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if guidance_channels is not None and not 1 <= guidance_channels <= in_channels:
            raise ValueError(
                f"guidance_channels must be None (all) or in [1, in_channels={in_channels}], got {guidance_channels!r}"
            )
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.input_size = input_size
        self.num_classes = num_classes
        self.guidance_channels = guidance_channels
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed 2-D sin-cos position embedding; a persistent buffer keeps the reference key `pos_embed`.
        pos = get_2d_sincos_pos_embed(hidden_size, int(num_patches**0.5))
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

        if isinstance(routing, dict):
            routing = DTRConfig(**routing)
        self.routing = routing
        if routing is not None and routing.beta < 1.0:
            table = dtr_mask_table(routing.num_tasks, hidden_size, routing.alpha, routing.beta)
            # One table shared by all blocks; not a state-dict entry (derived from the config).
            self.register_buffer("mask_table", table, persistent=False)
        else:
            self.mask_table = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference DiT's initialisation (xavier-uniform linears, N(0, 0.02) embeddings, adaLN-Zero).

        Under `deepspeed.zero.Init` (ZeRO-3) each submodule's parameters are partitioned as soon as it is
        built; every initialiser below then runs on that one module's gathered parameters and rank 0's
        values are partitioned back (`GatheredParameters(modifier_rank=0)`), so no rank ever holds the
        whole model and the random draws come in the same order as without ZeRO-3 (identical weights).
        """

        def init(params: list[nn.Parameter], fn) -> None:
            with _gathered(params):
                fn()

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                params = [module.weight] + ([module.bias] if module.bias is not None else [])

                def linear() -> None:
                    torch.nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.constant_(module.bias, 0)

                init(params, linear)

        self.apply(_basic_init)
        proj = self.x_embedder.proj

        def patch() -> None:
            w = proj.weight.data
            nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
            nn.init.constant_(proj.bias, 0)

        init([proj.weight, proj.bias], patch)
        table = self.y_embedder.embedding_table.weight
        init([table], lambda: nn.init.normal_(table, std=0.02))
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            init([layer.weight], lambda layer=layer: nn.init.normal_(layer.weight, std=0.02))
        # adaLN-Zero: every block and the final layer start as the identity / zero output.
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zeroed:

            def zero(layer=layer) -> None:
                nn.init.constant_(layer.weight, 0)
                nn.init.constant_(layer.bias, 0)

            init([layer.weight, layer.bias], zero)

    def routing_mask(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """(B, 1, C) 0/1 mask of each sample's own timestep, or None without routing."""
        if self.mask_table is None:
            return None
        index = t.round().long() if t.is_floating_point() else t.long()
        # The range check reads the data (a host sync): at sampling time only, where a respaced sampler
        # could pass the wrong indices. Training draws t in range by construction (mtl/sampling.py) and
        # must not sync per micro-batch; compiled graphs keep indexing's own bounds assertion.
        checked = not self.training and not torch.compiler.is_compiling()
        if checked and (index.min() < 0 or index.max() >= self.mask_table.shape[0]):
            raise ValueError(
                f"timestep index out of range for the DTR table with {self.mask_table.shape[0]} tasks: "
                f"got [{int(index.min())}, {int(index.max())}] (a respaced sampler must pass original indices)"
            )
        return self.mask_table[index].unsqueeze(1).to(dtype)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C_out) -> (B, C_out, H, W)."""
        # The reference DiT's reshape + einsum("nhwpqc->nchpwq") + reshape, as one rearrange.
        h, p = int(x.shape[1] ** 0.5), self.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=p, q=p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        return_hidden_at: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) latents, t (B,) original timestep indices, y (B,) labels; force_drop_ids (B,) long,
        given: 1 replaces the label by the null class, instead of the embedder's own random dropout in training
        (the reference LabelEmbedder's argument; the trainer draws it per sample, train/draws.py). Returns the
        output (B, C_out, H, W); with return_hidden_at=d (1..depth), (output, the tokens (B, N, hidden) after
        block d, N = (H/p)(W/p), in x's dtype): REPA's alignment input, the tokens REPA's SiT projects into its
        `zs` at block `encoder_depth`. ValueError for d outside 1..depth."""
        if return_hidden_at is not None and not 1 <= return_hidden_at <= len(self.blocks):
            raise ValueError(
                f"return_hidden_at={return_hidden_at}: expected a block in 1..{len(self.blocks)}"
            )
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        mask = self.routing_mask(t, x.dtype)
        hidden = None
        for index, block in enumerate(self.blocks, 1):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, mask, use_reentrant=False)
            else:
                x = block(x, c, mask)
            if index == return_hidden_at:
                hidden = x
        out = self.unpatchify(self.final_layer(x, c))
        return out if return_hidden_at is None else (out, hidden)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries the null label.

        eps = eps_uncond + s * (eps_cond - eps_uncond) on the first `guidance_channels` channels
        (all latent channels by default); the learned-variance channels pass through unguided.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        guided = self.in_channels if self.guidance_channels is None else self.guidance_channels
        eps, rest = model_out[:, :guided], model_out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    def flops_per_sample(self) -> float:
        """Forward matmul FLOPs of one sample (2 * MACs of linear/attention layers), for MFU."""
        n = self.x_embedder.num_patches
        d = self.t_embedder.mlp[2].out_features
        mlp_hidden = self.blocks[0].mlp.fc1.out_features if len(self.blocks) else 0
        per_block = 2 * n * (3 * d * d + d * d + 2 * d * mlp_hidden) + 2 * 2 * n * n * d + 2 * d * 6 * d
        patch = 2 * n * d * self.in_channels * self.patch_size**2
        final = 2 * n * d * self.patch_size**2 * self.out_channels + 2 * d * 2 * d
        return float(len(self.blocks) * per_block + patch + final)


_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def _factory(size: str, patch: int):
    hidden, depth, heads = _SIZES[size]

    def build(**kwargs) -> DiT:
        # The named size is the default; explicit keyword arguments (e.g. a smaller demo) override it.
        return DiT(
            **{"hidden_size": hidden, "depth": depth, "num_heads": heads, "patch_size": patch, **kwargs}
        )

    build.__name__ = f"DiT_{size}_{patch}"
    return build


# 'DiT-XL/2', 'DiT-L/4', ... -> constructor taking the remaining DiT keyword arguments.
DiT_models = {
    f"DiT-{size}/{patch}": _factory(size, patch) for size in ("XL", "L", "B", "S") for patch in (2, 4, 8)
}
