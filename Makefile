# The two commands a newcomer types: `make demo` (the whole pipeline on the embedded corpus) and `make test`.
# Every target creates the virtual environment when it is missing. torch==2.13.0 goes first: it is the CPU build
# on this machine's disk; a bare `torch` would pull a CUDA build of several GB.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
OUT ?= runs/demo

.PHONY: setup test demo bench bench-table lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# pytest exits 5 when no test is collected: that is not a failure of the suite.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

demo: setup
	$(VENV)/bin/apertus info tiny
	$(PY) runs/demo.py --out $(OUT)

# every benchmark writes its log to bench/results/ (bench/_log.py); bench-table turns the logs into the README's table.
# bench/gpu.py needs a GPU and has its own entry point, bench/gpu.sh; bench/quant.py needs a trained checkpoint
# (`python bench/quant.py runs/demo/pretrain/hf` after `make demo`).
BENCHES := $(filter-out bench/table.py bench/gpu.py bench/quant.py,$(wildcard bench/[a-z]*.py))

# llama.cpp is the peer of bench/decode.py: llama-cpp-python compiles it from source (~10 minutes, once)
bench: setup
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PIP) install -q -e ".[llama]"
	@for b in $(BENCHES); do echo "== $$b"; $(PY) $$b || exit 1; done
	$(PY) bench/table.py

bench-table:
	python3 bench/table.py

lint: setup
	$(VENV)/bin/ruff check src tests bench runs

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
