# The two quick-start commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUN := runs/demo
# Tests and benchmarks read the shared data mirror when it sits beside the clone.
ifneq ($(wildcard ../shared/data),)
export SCRATCHLLM_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: demo classify-demo base test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	touch $(STAMP)

# The main job: tokenizer -> token shards -> a small GPT pretrained on CPU -> samples.
# Each step is one `scratchllm` command; re-running resumes or skips what is already done.
demo: $(STAMP)
	$(BIN)/scratchllm tokenizer train --data shakespeare --vocab-size 4096 --out $(RUN)/tokenizer.json
	$(BIN)/scratchllm tokenizer encode --tokenizer $(RUN)/tokenizer.json \
		--text "To be, or not to be, that is the question." --pieces
	$(BIN)/scratchllm prepare --data shakespeare --tokenizer $(RUN)/tokenizer.json --out $(RUN)/data
	$(BIN)/scratchllm pretrain --config configs/shakespeare-bpe-cpu.toml --out $(RUN)/model \
		--data.shards=$(RUN)/data --resume
	$(BIN)/scratchllm generate --checkpoint $(RUN)/model --prompt "JULIET:" \
		--max-new-tokens 120 --temperature 0.8 --top-k 50 --seed 7

# The classification demo: the main job's model (trained first if missing) fine-tuned into an
# SMS spam classifier (shared data, offline), then used from the command line.
SPAM := runs/spam
classify-demo: $(STAMP) $(RUN)/model/config.toml
	$(BIN)/scratchllm finetune classify --config configs/sms-spam-classify.toml \
		--checkpoint $(RUN)/model --out $(SPAM) --resume
	$(BIN)/scratchllm classify --checkpoint $(SPAM) \
		"WINNER!! You have been selected for a FREE prize. Call 09061701461 to claim now" \
		"Sorry, I'll be late tonight, see you at the station"

$(RUN)/model/config.toml:
	$(MAKE) demo

# The offline base of the fine-tuning walkthrough (docs/finetune.md): a 6-layer GPT pretrained
# on Shakespeare + the Gutenberg novels, about 30-45 minutes on 2 cores; rerunning resumes.
BASE := runs/base
base: $(STAMP)
	$(BIN)/scratchllm pretrain --config configs/offline-base.toml --out $(BASE) --resume
	$(BIN)/scratchllm generate --checkpoint $(BASE) --prompt '"Well," said' \
		--max-new-tokens 120 --temperature 0.8 --top-k 50 --seed 7

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check scratchllm tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
