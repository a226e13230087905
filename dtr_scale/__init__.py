"""dtr-scale: Diffusion Transformers at scale with Denoising Task Routing and ANT loss balancing."""

__version__ = "0.1.0"
