"""Sharded exponential moving average of the model weights (fp32).

Each rank keeps the EMA of about P/world parameter values, so the EMA costs no communication and no
full copy of the model per rank. What a rank owns is described by *segments* `(name, start, length)`:
elements `[start, start + length)` of the flattened parameter `name`.

- ZeRO 0/1/2: parameters are whole on every rank. The parameters (in `named_parameters` order) are
  seen as one flat vector of P values cut into `world` contiguous ranges; rank r owns range r.
- ZeRO-3: each parameter is partitioned by DeepSpeed; rank r holds `param.ds_tensor`, elements
  `[r * n_part, (r + 1) * n_part)` of the flattened parameter (the last slice padded). The EMA follows
  that partition and reads only `ds_tensor`, never a partitioned parameter as if it were whole.

The EMA averages the **fp32 master weights** (as the reference DiT, whose EMA reads fp32 parameters), read
where DeepSpeed keeps them, without communication:
- ZeRO 1/2 (and bf16 at stage 0): each parameter DeepSpeed's optimizer partition covers on this rank has an
  fp32 fragment (`param._hp_mapping`, what `deepspeed.utils.safe_get_full_fp32_param` assembles); the
  segments are those fragments, so rank r averages exactly the fp32 values its optimizer updates.
- ZeRO-3: `deepspeed.utils.safe_get_local_fp32_param` (this rank's fp32 partition).
- fp32 at stage 0 (no master copy): the parameters themselves, cut into `world` contiguous ranges.
Under bf16 the module's own weights are rounded copies of the master; averaging them would add that
rounding to every EMA update.

The segments are saved with the shard, so `convert` reassembles full tensors from any number of
rank files without knowing how they were cut.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

Segment = tuple[str, int, int]


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


def _fp32_fragment(p: torch.Tensor):
    """DeepSpeed's fp32 master fragment mapping of a ZeRO-1/2 (or bf16 stage-0) parameter on this rank."""
    return getattr(p, "_hp_mapping", None)


def _has_master_fragments(params: list[tuple[str, torch.Tensor]]) -> bool:
    return any(_fp32_fragment(p) is not None for _, p in params)


def shard_segments(module: nn.Module, rank: int, world_size: int) -> list[Segment]:
    """The (name, start, length) pieces of `module`'s parameters that `rank` owns."""
    params = list(module.named_parameters())
    if _has_master_fragments(params):  # follow DeepSpeed's own fp32 partition (ZeRO 1/2, bf16 stage 0)
        segments = []
        for name, p in params:
            mapping = _fp32_fragment(p)
            if mapping is not None and mapping.lp_fragment_address.numel:
                address = mapping.lp_fragment_address
                segments.append((name, int(address.start), int(address.numel)))
        return segments
    if params and _is_zero3_param(params[0][1]):
        segments = []
        for name, p in params:
            part = p.ds_tensor.numel()
            start = rank * part
            length = max(0, min(part, p.ds_numel - start))
            if length:
                segments.append((name, start, length))
        return segments
    total = sum(p.numel() for _, p in params)
    per_rank = math.ceil(total / world_size) if total else 0
    lo, hi = rank * per_rank, min(total, (rank + 1) * per_rank)
    segments, offset = [], 0
    for name, p in params:
        a, b = max(lo, offset), min(hi, offset + p.numel())
        if a < b:
            segments.append((name, a - offset, b - a))
        offset += p.numel()
    return segments


class ShardedEMA:
    """EMA over this rank's segments of `module`'s parameters: ema = d * ema + (1 - d) * param."""

    def __init__(
        self,
        module: nn.Module,
        decay: float = 0.9999,
        warmup: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.module = module
        self.decay = decay
        self.warmup = warmup
        self.rank, self.world_size = rank, world_size
        self.segments = shard_segments(module, rank, world_size)
        self._params = dict(module.named_parameters())
        self.shard = torch.zeros(
            sum(length for _, _, length in self.segments),
            dtype=torch.float32,
            device=next(iter(self._params.values())).device,
        )
        self.num_updates = 0
        self.copy_from_model()

    def _local_values(self, name: str, start: int, length: int) -> torch.Tensor:
        """This rank's fp32 master values of segment (name, start, length) (see the module docstring)."""
        p = self._params[name]
        if _is_zero3_param(p):
            if hasattr(p, "_z3_optimizer"):  # the optimizer's fp32 partition, not the bf16 ds_tensor
                from deepspeed.utils import safe_get_local_fp32_param

                return safe_get_local_fp32_param(p).detach().view(-1)[:length]
            return p.ds_tensor.detach().view(-1)[:length]
        mapping = _fp32_fragment(p)
        if mapping is not None:
            return mapping.get_hp_fragment().detach().view(-1)[:length]
        return p.detach().view(-1)[start : start + length]

    def _views(self):
        offset = 0
        for name, start, length in self.segments:
            yield self.shard[offset : offset + length], self._local_values(name, start, length)
            offset += length

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Set this rank's EMA shard to the current fp32 master weights."""
        for ema, value in self._views():
            ema.copy_(value.float())

    def current_decay(self) -> float:
        """The decay of the next update: ema_decay, or min(ema_decay, (1 + n) / (10 + n)) with warmup."""
        if self.warmup:  # optional warm-up: (1 + n) / (10 + n), capped at decay
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step of this rank's shard from the fp32 master weights (after each optimizer step; no
        communication)."""
        decay = self.current_decay()
        for ema, value in self._views():
            ema.mul_(decay).add_(value.float(), alpha=1 - decay)
        self.num_updates += 1

    def state_dict(self) -> dict:
        """This rank's shard (float32), its segments and the update count."""
        return {
            "shard": self.shard.detach().cpu(),
            "segments": [list(s) for s in self.segments],
            "num_updates": self.num_updates,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`; ValueError when the segments differ (another model or world size)."""
        segments = [tuple(s) for s in state["segments"]]
        if segments != self.segments:
            raise ValueError(
                "EMA shard layout in the checkpoint differs from this run's (different world size, ZeRO "
                "stage or model); resume with the world size and zero_stage the checkpoint was written with"
            )
        self.shard.copy_(state["shard"].to(self.shard.device))
        self.num_updates = int(state["num_updates"])

    def reshard_states(self, states: list[dict], rank: int | None = None) -> dict:
        """This rank's state from every old rank's (another world size or ZeRO stage): the full fp32 EMA
        tensors are put together from the old segments (checkpoint_format.assemble_ema_shards) and this rank
        takes its own segments of them. Holds one full fp32 copy of the model while it runs (resume only)."""
        from dtr_scale.checkpoint_format import assemble_ema_shards

        shapes = {
            n: tuple(p.ds_shape) if _is_zero3_param(p) else tuple(p.shape) for n, p in self._params.items()
        }
        full = assemble_ema_shards(states, shapes)
        pieces = [full[name].reshape(-1)[start : start + length] for name, start, length in self.segments]
        shard = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float32)
        return {
            "shard": shard,
            "segments": [list(s) for s in self.segments],
            "num_updates": int(states[0]["num_updates"]),
            "decay": states[0]["decay"],
        }

    @torch.no_grad()
    def gather(self, dst: int | None = 0) -> dict[str, torch.Tensor] | None:
        """Full fp32 EMA tensors (collective); returned on `dst` (all ranks when dst is None).

        One parameter at a time: each rank writes the pieces it owns into a zero tensor of that parameter's
        size and the ranks sum them (owned pieces are disjoint). A rank other than `dst` then drops it, so
        it never holds more than one parameter beyond its own shard (no full model on every rank).
        """
        shapes = {
            name: tuple(p.ds_shape) if _is_zero3_param(p) else tuple(p.shape)
            for name, p in self._params.items()
        }
        owned: dict[str, list[tuple[int, int, int]]] = {name: [] for name in shapes}
        offset = 0
        for name, start, length in self.segments:
            owned[name].append((start, length, offset))
            offset += length
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        keep = dst is None or not distributed or dist.get_rank() == dst
        full: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            tensor = torch.zeros(math.prod(shape), dtype=torch.float32, device=self.shard.device)
            for start, length, at in owned[name]:
                tensor[start : start + length] = self.shard[at : at + length]
            if distributed:
                if dst is None:
                    dist.all_reduce(tensor)
                else:
                    dist.reduce(tensor, dst=dst)
            if keep:
                full[name] = tensor.view(shape)
        return full if keep else None
