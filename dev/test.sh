#!/usr/bin/env bash
# The test suite, from a fresh clone: installs what it needs (./mc_setup --dev), then runs pytest.
#   bash dev/test.sh                 # everything (CPU, offline, ~10 minutes on 2 cores)
#   bash dev/test.sh tests/test_gpt.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
./mc_setup --dev
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest "$@"
