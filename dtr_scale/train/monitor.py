"""What a person watching a run sees: progress bar, TensorBoard, and a metrics.jsonl (rank 0 only).

Model FLOPs utilisation (MFU) = achieved model FLOP/s / (world x peak FLOP/s per device). Achieved
FLOP/s counts 3x the forward matmul FLOPs of `DiT.flops_per_sample` per trained sample (backward is
~2x forward; activation-checkpoint recompute not counted, as in the PaLM definition). Peak per device:
`monitor.peak_tflops` if set, else a table of dense bf16 peaks by device name (A100 312, H100/H200
SXM 989, H100 PCIe 756 TFLOP/s); unknown devices (this CPU included) log no MFU.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dtr_scale.data.images import quantize_uint8
from dtr_scale.fileio import atomic_write_text

PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops_per_device(device: torch.device, configured_tflops: float | None) -> float | None:
    """Peak dense bf16 FLOP/s of a device for MFU: monitor.peak_tflops if set, else looked up from the CUDA
    device name; None on CPU or an unknown GPU."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    """memory/* scalars: CUDA allocated/reserved peaks (GiB) on a GPU, the process RSS (GiB) on the CPU."""
    if device.type == "cuda":
        return {
            "memory/allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        }
    import psutil

    return {"memory/rss_gib": psutil.Process().memory_info().rss / 2**30}


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (H', W', 3) grid with a 2-pixel border."""
    images = torch.from_numpy(quantize_uint8(images))
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = math.ceil(b / ncol)
    grid = torch.zeros(3, nrows * (h + 2) + 2, ncol * (w + 2) + 2, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, ncol)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = images[i]
    return grid.permute(1, 2, 0).numpy()


def loss_profile_image(means: torch.Tensor, counts: torch.Tensor, num_timesteps: int) -> np.ndarray:
    """A bar chart of the mean loss per t bin (log scale, low t on the left), uint8 (H, W, 3).

    One bar per bin of `means` (bins,); empty bins (count 0) are left blank. The y axis spans the
    bins' smallest to largest mean in decades, labelled, so cluster losses that differ by 1000x (eps
    prediction: tiny at high t) all stay visible.
    """
    from PIL import Image, ImageDraw

    width, height, left, bottom, top = 420, 220, 54, 24, 16
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    present = counts > 0
    if present.any():
        values = means[present].clamp(min=1e-12).log10()
        low, high = float(values.min().floor()), float(values.max().ceil())
        high = max(high, low + 1)
        bins = len(means)
        bar = (width - left - 4) / bins
        for j in range(bins):
            if not present[j]:
                continue
            level = (float(means[j].clamp(min=1e-12).log10()) - low) / (high - low)
            y = height - bottom - level * (height - bottom - top)
            x0 = left + j * bar
            draw.rectangle([x0 + 1, y, x0 + bar - 1, height - bottom], fill=(60, 110, 200))
        for decade in range(int(low), int(high) + 1):
            y = height - bottom - (decade - low) / (high - low) * (height - bottom - top)
            draw.line([left - 4, y, left, y], fill=(0, 0, 0))
            draw.text((2, y - 6), f"1e{decade}", fill=(0, 0, 0))
    draw.line([left, top, left, height - bottom, width - 4, height - bottom], fill=(0, 0, 0))
    draw.text((left + 8, 0), "mean training loss per bin of t (log scale)", fill=(0, 0, 0))
    draw.text((left, height - bottom + 6), "t = 0", fill=(0, 0, 0))
    draw.text((width - 60, height - bottom + 6), f"t = {num_timesteps - 1}", fill=(0, 0, 0))
    return np.asarray(image)


class Monitor:
    """Rank-0 logging; every method is a no-op on other ranks."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        max_steps: int,
        flops_per_sample: float,
        peak_flops: float | None,
        tensorboard: bool = True,
        progress: bool = True,
        start_step: int = 0,
        config_text: str | None = None,
        num_clusters: int = 1,
    ):
        self.active = rank == 0
        self.world_size = world_size
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self.writer = None
        self.bar = None
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self.metrics_failing = False  # the last metrics.jsonl record could not be written (record())
        if not self.active:
            return
        self._truncate_metrics(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
            if config_text:
                self.writer.add_text("config", "```yaml\n" + config_text + "\n```", start_step)
            if num_clusters > 1:  # CUSTOM SCALARS tab: the curves of all clusters of a kind on one chart
                ks = range(num_clusters)
                self.writer.add_custom_scalars({"ANT clusters": {
                    "cluster losses": ["Multiline", [f"cluster/loss_{i}" for i in ks]],
                    "cluster weights": ["Multiline", [f"cluster/weight_{i}" for i in ks]],
                    "cluster samples per step": ["Multiline", [f"cluster/count_{i}" for i in ks]],
                }})  # fmt: skip
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=max_steps, initial=start_step, dynamic_ncols=True, desc="train", unit="step"
            )

    def _truncate_metrics(self, start_step: int) -> None:
        """On resume, drop lines logged after the checkpoint (the resumed run writes them again). A line that is
        not a JSON object with an integer step (a line torn by a kill mid-write, or one edited by hand) is
        dropped with a warning naming the file and line; the rewrite is atomic."""
        if not self.metrics_path.exists():
            return
        text = self.metrics_path.read_bytes().decode("utf-8", errors="replace")
        kept = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            step = _logged_step(line)
            if step is None:
                warnings.warn(
                    f"{self.metrics_path}:{number}: dropped a line that is not a metrics record (torn by a kill?): "
                    f"{line[:80]!r}",
                    stacklevel=1,
                )
            elif step <= start_step:
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def step(self, step: int, scalars: dict[str, float], samples_per_step: int) -> dict[str, float]:
        """Log one optimizer step's scalars; adds throughput, MFU and memory figures."""
        if not self.active:
            return scalars
        now = time.perf_counter()
        steps = max(1, step - self._last_step)
        seconds = (now - self._last_time) / steps
        self._last_time, self._last_step = now, step
        scalars = dict(scalars)
        scalars["perf/step_time_s"] = seconds
        scalars["perf/img_per_s"] = samples_per_step / seconds
        scalars["perf/img_per_s_per_device"] = samples_per_step / seconds / self.world_size
        if self.peak_flops:
            achieved = 3 * self.flops_per_sample * samples_per_step / seconds
            scalars["perf/mfu"] = achieved / (self.world_size * self.peak_flops)
        self.record(step, scalars)
        if self.bar is not None:
            # tqdm's own rate (step/s) and ETA; the postfix adds what tqdm cannot know.
            self.bar.set_postfix(
                loss=f"{scalars.get('loss/mean', float('nan')):.4f}",
                img_s=f"{scalars['perf/img_per_s']:.1f}",
                refresh=False,
            )
            self.bar.update(step - self.bar.n)
        return scalars

    def record(self, step: int, values: dict[str, float]) -> None:
        """Log a record of named float scalars at `step` to metrics.jsonl and TensorBoard alike (rank 0), without
        the throughput figures of `step` (a skipped optimizer step between two logged ones)."""
        if not self.active:
            return
        # strict JSON: a non-finite value (a skipped step's grad_norm) is written as null, never as Infinity
        record = {k: float(v) if math.isfinite(float(v)) else None for k, v in values.items()}
        line = json.dumps({"step": step, **record}) + "\n"
        try:
            with open(self.metrics_path, "a") as fh:
                fh.write(line)
        except (
            OSError
        ) as err:  # a full disk: rank 0 alone must not die here, with the other ranks left waiting
            if not self.metrics_failing:  # one line per streak of failed records
                self.message(
                    f"{self.metrics_path}: the record of step {step} was not written ({err.strerror or err}); "
                    "training goes on, and the next checkpoint stops the run if the disk is full"
                )
            self.metrics_failing = True
        else:
            self.metrics_failing = False
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log named float scalars at `step` to TensorBoard (rank 0)."""
        if self.active and self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def image(self, tag: str, step: int, grid: np.ndarray, png_path: Path | None = None) -> None:
        """Log a uint8 (H, W, 3) image at `step` to TensorBoard, and to `png_path` if given (rank 0)."""
        if not self.active:
            return
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="HWC")
        if png_path is not None:
            from PIL import Image

            png_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(png_path)

    def message(self, text: str) -> None:
        """A line through the progress bar (rank 0)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Flush and close TensorBoard and the progress bar (once; a second call does nothing)."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        self.bar = self.writer = None


def cosine_image(gram: torch.Tensor, cell: int = 16) -> np.ndarray:
    """The (k, k) gradient-cosine matrix of a Gram as a uint8 (k*cell, k*cell, 3) image: -1 black, +1 white."""
    from dtr_scale.mtl.gram import cosine_from_gram

    cos = cosine_from_gram(gram).float().clamp(-1, 1)
    image = ((cos + 1) * 127.5).round().to(torch.uint8).cpu()
    return image.repeat_interleave(cell, 0).repeat_interleave(cell, 1).unsqueeze(-1).repeat(1, 1, 3).numpy()


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line (a JSON object; a missing step counts as 0), None if it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step", 0)
    return step if isinstance(step, int) and not isinstance(step, bool) else None
