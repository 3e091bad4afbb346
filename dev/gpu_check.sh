#!/usr/bin/env bash
# The GPU check (dev/gpu_check.py): every stage once with bf16 + torch.compile on one GPU, tok/s, MFU,
# peak memory and vanilla-vs-MC throughput into one JSON; --dry_run runs the same script at tiny sizes on
# the CPU (the test suite does). Uses .venv's Python when there is one.
#   bash dev/gpu_check.sh --out gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" dev/gpu_check.py "$@"
