"""After training: the portable model directory (`model_dir`), `convert`, multi-process `sampler`, and
offline FID / KID / precision-recall (`evaluate`).

Submodules are imported by name (`from dtr_scale.sample.sampler import sample_to_dir`) so that importing
one of them does not pull the others' dependencies (torch-fidelity, diffusers).
"""
