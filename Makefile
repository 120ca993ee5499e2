# jaxtune: the two commands of the README, plus the slow tests and the benchmarks.
#
#   make demo    set up .venv and fine-tune SmolLM2-135M-Instruct with LoRA on the bundled task (CPU)
#   make test    set up .venv with the test extras and run the default test suite (CPU)
#
#   make demo-smoke   the demo shortened (3 steps, 2 eval batches, 4 task examples) and generation
#                     with the built-in model and the trained adapter: CI runs it in a venv with the
#                     base install only (make demo-smoke VENV=.venv-base), as a fresh machine has

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is only needed by the tests and benchmarks (the reference models and PEFT). Take the CPU
# build from PyTorch's CPU index so that a fresh machine never downloads a multi-GB CUDA wheel.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
SMOKE_WORKDIR ?= runs/demo-smoke

.PHONY: setup setup-test demo demo-smoke test test-slow test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q "torch==2.13.0" --index-url $(TORCH_INDEX)
	$(BIN)/pip install -q -e ".[test,plot]"
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

demo: setup
	$(BIN)/python -m jaxtune.train --config=configs/lora_llama.py

demo-smoke: setup
	rm -rf $(SMOKE_WORKDIR)
	$(BIN)/python -m jaxtune.train --config=configs/lora_llama.py --workdir=$(SMOKE_WORKDIR) \
		--config.train.steps=3 --config.train.eval_every=0 --config.train.eval_batches=2 \
		--config.train.task_examples=4
	$(BIN)/python -m jaxtune.generate --model=smollm2-135m-instruct \
		--prompt="What is the capital of France?" --max_new_tokens=16 > $(SMOKE_WORKDIR)/generated.txt
	$(BIN)/python -m jaxtune.generate --adapter=$(SMOKE_WORKDIR) --prompt="Hello" --max_new_tokens=8 \
		>> $(SMOKE_WORKDIR)/generated.txt
	cat $(SMOKE_WORKDIR)/generated.txt
	grep -q "Paris" $(SMOKE_WORKDIR)/generated.txt || { echo "the built-in model did not answer Paris" >&2; exit 1; }

test: setup-test
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup-test
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup-test
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .venv-base runs
