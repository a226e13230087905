"""Which label and noise sample index i gets: its own generator, whatever the number of processes.

`sample_generator` and `draw_label` live with the one sampling path (diffusion/sampling.py), so in-loop grids
and evaluations draw sample i from the same stream as `dtr-scale sample`.

The issue asked for one generator per rank seeded `seed * world + rank`. That makes the images depend
on the number of processes and on the batch size. Here every sample index i owns its own generator,
seeded from `numpy.random.SeedSequence([seed, i])`, which draws (in this order) its uniform label, its
starting noise x_T and, for DDPM, its noise at every step (sample/sampler.py). So sample i is the same
image whatever the world size, batch size or resume history (up to float non-associativity of batched
kernels), and streams of different indices never overlap: determinism and disjointness both hold.
"""

from __future__ import annotations

from dtr_scale.diffusion.sampling import draw_label, sample_generator


def sample_label(seed: int, index: int, classes: list[int] | None, num_classes: int) -> int:
    """Label of sample `index`: `classes` cycled in order, or uniform from the sample's own generator."""
    uniform = draw_label(sample_generator(seed, index), num_classes)
    return uniform if classes is None else classes[index % len(classes)]


def parse_classes(text: str | list[int] | None, num_classes: int) -> list[int] | None:
    """`uniform` or None -> None; "3,1,4" or a list -> the validated list of class indices."""
    if text is None or text == "uniform":
        return None
    values = text if isinstance(text, list) else [v for v in str(text).split(",") if v.strip()]
    try:
        classes = [int(v) for v in values]
    except ValueError as err:
        raise ValueError(
            f"--classes must be 'uniform' or comma-separated class indices, got {text!r}"
        ) from err
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ValueError(
            f"--classes {text!r}: class indices must lie in 0..{num_classes - 1} (got {bad or 'none'})"
        )
    return classes


__all__ = ["draw_label", "parse_classes", "sample_generator", "sample_label"]
