# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# constraints.txt pins torch 2.13.0; PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu gets its CPU build
	# where the package index would serve the CUDA one (README)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,onnx]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/advtune demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# test files run in parallel (a file's tests stay together: they share fixtures); three workers on two cores:
# the tests that wait on subprocesses (torchrun, the CLI) leave a core idle otherwise
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 3 --dist loadfile -m "not reference"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
