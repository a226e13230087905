"""After training: `convert` (DeepSpeed checkpoint -> a model directory, models/model_dir.py), multi-process
`sampler` (with `seeds`, `outputs`, `processes`), offline FID / KID / precision-recall (`evaluate`) and the digit
judge (`digits`).

Submodules are imported by name (`from dtr_scale.sample.sampler import sample_to_dir`) so that importing
one of them does not pull the others' dependencies (torch-fidelity, diffusers).
"""
