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

.PHONY: install demo train test test-fast lint flwr-run clean

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
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

flwr-run: $(STAMP)  ## the same app through Flower's own simulation engine (`flwr run .`)
	PATH=$(abspath $(VENV))/bin:$$PATH FLWR_HOME=$(abspath .flwr) $(VENV)/bin/flwr run . --stream \
	  --federation-config "num-supernodes=10" --run-config "data-dir='$(FEDLOWRANK_DATA)'"

clean:
	rm -rf runs .pytest_cache .ruff_cache
