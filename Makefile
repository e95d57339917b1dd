# `make demo` and `make test` create or update the project's virtual environment first.
# A GPU machine (nvidia-smi sees a GPU) reuses the container's torch, Transformer Engine
# and apex through --system-site-packages; a CPU machine installs the pinned CPU torch.
# pip installs without byte-compiling (half the install time here), so `make demo` starts
# sooner. `make test` compiles everything once first (compileall on every core): with
# PYTHONDONTWRITEBYTECODE set, as in many containers, each of the suite's hundreds of spawned
# ranks would otherwise recompile every torch module it imports.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
COMPILED := $(VENV)/.compiled
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
DEMO_ARGS ?=
SMOKE_RANKS ?= 4
SMOKE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo smoke lint test test-fast test-gpu gpu-check venv clean system-packages

# The Slurm tests start a real single-node Slurm (Debian's slurm-wlm and munge) and check the
# templates with shellcheck. As root on Debian they are installed when missing; elsewhere the
# tests say what is missing (and fail rather than skip under CI=true).
SYSTEM_PACKAGES := slurm-wlm munge shellcheck
SYSTEM_PROGRAMS := /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/bin/shellcheck

venv: $(STAMP)

# On a GPU machine the container's torch is pinned by a constraint file, so that nothing pip
# installs can replace it; Transformer Engine is installed only where the container lacks it.
TORCH_CONSTRAINT := $(VENV)/torch-constraint.txt
PIP := $(BIN)/pip install -q --disable-pip-version-check --no-compile

$(STAMP): requirements.txt requirements-cpu.txt requirements-gpu.txt requirements-dev.txt pyproject.toml
ifeq ($(HAS_GPU),yes)
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(TORCH_CONSTRAINT)
	$(BIN)/python -c "import transformer_engine" 2>/dev/null || \
		$(PIP) --no-build-isolation -c $(TORCH_CONSTRAINT) -r requirements-gpu.txt
	$(PIP) -c $(TORCH_CONSTRAINT) -r requirements.txt -r requirements-dev.txt
else
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements-cpu.txt
	$(PIP) -r requirements.txt -r requirements-dev.txt
endif
	$(BIN)/pip install -q --disable-pip-version-check --no-compile --no-deps --no-build-isolation -e .
	touch $(STAMP)

# As pip would, skip the files that do not compile (torch ships Python 3.12-only test helpers).
$(COMPILED): $(STAMP)
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $(COMPILED)

demo: $(STAMP)
	$(BIN)/python -m hpd_megatron.demo $(DEMO_ARGS)

# The tuned, repeated study of the methods (docs/study.md, hpd_megatron/study/protocol.py):
# one process; finished runs are kept in runs/study/ledger.json, so a rerun resumes.
# STUDY_ARGS=--fresh starts over; --methods/--regimes/--on-policy pick a subset.
STUDY_ARGS ?=

.PHONY: study
study: $(STAMP)
	$(BIN)/python -m hpd_megatron.study.protocol --out runs/study $(STUDY_ARGS)

smoke: $(STAMP)
	$(BIN)/torchrun --standalone --nproc-per-node $(SMOKE_RANKS) -m hpd_megatron.smoke $(SMOKE_ARGS)

system-packages:
	@missing=no; for program in $(SYSTEM_PROGRAMS); do test -x $$program || missing=yes; done; \
	if [ $$missing = yes ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(SYSTEM_PACKAGES) for the Slurm tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; }; \
	fi

# ruff's linter and formatter, at the version requirements-dev.txt pins (make test runs it).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(COMPILED) system-packages lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# For development: the single-process tests only (no gloo ranks, torchrun, Slurm or servers).
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -m "not multirank and not slow" $(PYTEST_ARGS)

# On a GPU node (in the container): the trainer end to end (torchrun, Transformer Engine spec,
# bf16, HPD with a teacher; TP2 and PP2 against TP1 with two GPUs or more), a bf16 resume
# without optimizer state, the converter's --verify and a TE step over NCCL: a few minutes
# on one GPU. Fails (does not skip) where torch has no CUDA (tests/gpu/conftest.py); -rs
# lists what this node's GPU count skipped.
test-gpu: $(COMPILED)
	HPD_GPU_TESTS=1 $(BIN)/python -m pytest -rs tests/gpu $(PYTEST_ARGS)

# The first GPU session's one command (bench/gpu_check.py): make test-gpu, the GPU bench, the
# rollout bench at Qwen2.5-1.5B shape, the FP8 teacher against bf16 and the converter's bf16
# --verify, in about 9 minutes on one GPU; bench/results/gpu_check.json and .md.
# DRY_RUN=1 runs every step's code with tiny shapes on the CPU (make test does).
DRY_RUN ?=
GPU_CHECK_OUT ?= bench/results
gpu-check: $(COMPILED)
	$(BIN)/python bench/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf $(VENV) .pytest_cache
