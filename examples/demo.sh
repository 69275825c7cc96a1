#!/usr/bin/env bash
# The main job in one command: set up .venv (torch 2.13.0, the CPU build where an index offers one: see
# .ci/install_torch) and run the demo on a tiny model built from a config (no download). Extra arguments go to
# demo.py (e.g. --model qwen3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
exec .venv/bin/python examples/demo.py "$@"
