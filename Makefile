# jaxtune: the two commands of the README, plus the slow tests and the benchmarks.
#
#   make demo    set up .venv and fine-tune SmolLM2-135M-Instruct with LoRA on the bundled task (CPU)
#   make test    set up .venv with the test extras and run the default test suite (CPU)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is only needed by the tests and benchmarks (the reference models and PEFT). Take the CPU
# build from PyTorch's CPU index so that a fresh machine never downloads a multi-GB CUDA wheel.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: setup setup-test demo test test-slow test-all bench clean

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
	rm -rf $(VENV) runs
