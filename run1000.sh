#!/usr/bin/env bash
# The "$1000 tier": one 8×H100 node, depth-32 model, FineWeb-Edu, about 40 hours.
#
#   bash run1000.sh                        # NPROC=8 by default
#   NPROC=4 bash run1000.sh                # fewer GPUs: same tokens per step, more grad accumulation
#
# The chat half ends with RL on GSM8K and its eval (SKIP_RL=1 stops after SFT).
# Re-running the same command continues it: finished stages and evals are skipped ("skip <stage>: why"),
# an interrupted training stage resumes from its last checkpoint. --fresh starts over (see dev/recipe_common.sh).
set -euo pipefail
cd "$(dirname "$0")"
DEPTH=${DEPTH:-32}
SHARDS=${SHARDS:-800}
DEVICE_BATCH=${DEVICE_BATCH:-16}   # depth 32 at 2048 tokens fits 16 rows per 80 GB GPU
source "$(dirname "$0")/dev/recipe_common.sh"
run_recipe "$@"
