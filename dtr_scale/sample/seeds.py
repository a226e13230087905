"""Which label and noise sample index i gets: its own generator, whatever the number of processes.

Every sample index i owns its own generator, seeded from `numpy.random.SeedSequence([seed, i])`, which draws
(in this order) its uniform label, its starting noise x_T and, for DDPM, its noise at every step
(diffusion/sampling.py: `sample_generators`, `denoise`; in-loop grids draw from the same streams). So sample i
is the same image whatever the world size, batch size or resume history (up to float non-associativity of
batched kernels), and streams of different indices never overlap. A generator per rank seeded
`seed * world + rank` would make the images depend on the number of processes and on the batch size.
"""

from __future__ import annotations

from dtr_scale.diffusion.sampling import sample_generators


def sample_label(seed: int, index: int, classes: list[int] | None, num_classes: int) -> int:
    """Label of sample `index`: `classes` cycled in order, or uniform from the sample's own generator."""
    return sample_generators(seed, [index], num_classes, classes)[1][0]


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
