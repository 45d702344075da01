# The two quick-start commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUN := runs/demo
export SCRATCHLLM_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/scratchllm tokenizer train --data shakespeare --vocab-size 4096 --out $(RUN)/tokenizer.json
	$(BIN)/scratchllm tokenizer stats --tokenizer $(RUN)/tokenizer.json --data shakespeare
	$(BIN)/scratchllm tokenizer encode --tokenizer $(RUN)/tokenizer.json \
		--text "To be, or not to be, that is the question." --pieces > $(RUN)/example-ids.txt
	cat $(RUN)/example-ids.txt
	$(BIN)/scratchllm tokenizer decode --tokenizer $(RUN)/tokenizer.json < $(RUN)/example-ids.txt

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check scratchllm tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
