# Two commands on a fresh machine:  `make demo` (the default federated run) and `make test`.
# Each installs into .venv on first use; re-running is a no-op until pyproject.toml changes.

VENV        ?= .venv
PYTHON      ?= python3
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build where a CPU wheel
# lies on local disk. On a GPU machine the same pin installs PyPI's CUDA build; override as you need,
# e.g. make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC  ?= torch==2.13.0
DATA        ?= ../shared/data
STAMP       := $(VENV)/.installed

export FEDLOWRANK_DATA ?= $(abspath $(DATA))
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo train test test-fast lint flwr-run gpu-wheels gpu-check clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)  ## the default run: MiniLM + TREC, 10 clients, Dirichlet 0.5, FedAvg-LoRA
	$(VENV)/bin/fedlowrank simulate $(ARGS)

train: $(STAMP)  ## centralized LoRA on the same task (the upper bound)
	$(VENV)/bin/fedlowrank train $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

flwr-run: $(STAMP)  ## the same app through Flower's own simulation engine (`flwr run .`)
	PATH=$(abspath $(VENV))/bin:$$PATH FLWR_HOME=$(abspath .flwr) $(VENV)/bin/flwr run . --stream \
	  --federation-config "num-supernodes=10" --run-config "data-dir='$(FEDLOWRANK_DATA)'"

# benchmarks/gpu_check.py on a GPU machine whose Python has torch, triton, transformers and peft (and numpy,
# scipy, rich, safetensors) but no network: `make gpu-wheels` here (PyPI reachable) fetches what else it needs
# into $(GPU_WHEELS) (< 1 MiB), which travels with the repository; `make gpu-check` there installs and runs it.
GPU_WHEELS      ?= .whl
GPU_WHEEL_SPECS ?= opacus==1.6.0 tomli-w==1.2.0
GPU_PYTHON      ?= python3

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux2014_x86_64 -d $(GPU_WHEELS) $(GPU_WHEEL_SPECS)

gpu-check:  ## every open GPU question in a few minutes: benchmarks/results/gpu/gpu_check.json
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $(GPU_WHEELS)/*.whl
	PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
