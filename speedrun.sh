#!/usr/bin/env bash
# The "$100 tier": one 8×H100 node, depth-20 model, FineWeb-Edu, about 4 hours.
#
#   bash speedrun.sh                       # NPROC=8 by default
#   NPROC=4 bash speedrun.sh               # fewer GPUs: same tokens per step, more grad accumulation
#   bash speedrun.sh -- --device_batch_size=16   # extra flags for scripts.base_train
#
# The chat half ends with RL on GSM8K and its eval (SKIP_RL=1 stops after SFT).
# Re-running the same command continues it: finished stages and evals are skipped ("skip <stage>: why"),
# an interrupted training stage resumes from its last checkpoint. --fresh starts over (see dev/recipe_common.sh).
set -euo pipefail
cd "$(dirname "$0")"
DEPTH=${DEPTH:-20}
SHARDS=${SHARDS:-240}            # ~54 chars/param × params ≈ the Chinchilla budget plus headroom
DEVICE_BATCH=${DEVICE_BATCH:-32}
source "$(dirname "$0")/dev/recipe_common.sh"
run_recipe "$@"
