# Shared body of speedrun.sh and run1000.sh (8-GPU recipes). Expects DEPTH, SHARDS, DEVICE_BATCH.
run_recipe() {
  local profile=baseline extra=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --profile) profile="$2"; shift ;;
      --profile=*) profile="${1#*=}" ;;
      --mc) profile=mc ;;
      --) shift; extra=("$@"); break ;;
      *) echo "unknown option $1 (--profile baseline|mc, or -- then base_train flags)" >&2; exit 2 ;;
    esac
    shift
  done
  local tag="d$DEPTH" mc_args=()
  case "$profile" in
    baseline) ;;
    mc) tag="d${DEPTH}_mc"
        mc_args=(--mc_enabled=1 --model_tag="$tag" --mc_num_random_variants=4 --mc_train_wc_length=0.2
                 --allocator_recent_tokens=128 --mc_auto_batch=1) ;;
    *) echo "unknown --profile $profile (baseline|mc)" >&2; exit 2 ;;
  esac
  [ -f .mc_env ] && source .mc_env
  export WANDB_RUN=${WANDB_RUN:-dummy}
  export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
  export OMP_NUM_THREADS=1
  local nproc=${NPROC:-8}
  ./mc_setup --gpu
  local PY=.venv/bin/python
  # Tokenizer shards first (8 ≈ 2B chars), the rest downloads while the tokenizer trains.
  $PY -m nanochat.dataset -n 8
  $PY -m nanochat.dataset -n "$SHARDS" > "$NANOCHAT_BASE_DIR/dataset_download.log" 2>&1 &
  local download_pid=$!
  $PY -m nanochat.report reset
  $PY -m scripts.tok_train --source=fineweb --vocab_size=65536 --max_chars=2000000000
  $PY -m scripts.tok_eval --source=fineweb
  wait "$download_pid" || { echo "shard download failed: see $NANOCHAT_BASE_DIR/dataset_download.log" >&2; exit 1; }
  .venv/bin/torchrun --standalone --nproc_per_node="$nproc" -m scripts.base_train \
    --depth="$DEPTH" --device_batch_size="$DEVICE_BATCH" --source=fineweb --run="$WANDB_RUN" --resume=auto \
    --eval_every=128M --sample_every=1B --save_every=1B --core_metric_every=2B ${mc_args[@]+"${mc_args[@]}"} ${extra[@]+"${extra[@]}"}
  .venv/bin/torchrun --standalone --nproc_per_node="$nproc" -m scripts.base_loss --source=fineweb --device_batch_size="$DEVICE_BATCH" --model_tag="$tag"
  .venv/bin/torchrun --standalone --nproc_per_node="$nproc" -m scripts.base_eval --bundle=official --model_tag="$tag"
  if [ "$profile" = mc ]; then
    .venv/bin/torchrun --standalone --nproc_per_node="$nproc" -m scripts.mc_eval --model_tag="$tag" \
      --num_docs=256 --probe_multipliers=4,16 --out="$NANOCHAT_BASE_DIR/report/mc_eval.json"
  fi
  # chat half: midtraining and SFT on the full (online) mixtures, each followed by chat eval
  local TR=(.venv/bin/torchrun --standalone --nproc_per_node="$nproc")
  "${TR[@]}" -m scripts.mid_train --source_tag="$tag" --mixture=full --run="$WANDB_RUN" --resume=auto --device_batch_size="$DEVICE_BATCH"
  "${TR[@]}" -m scripts.chat_eval -i mid --model-tag="$tag" --online
  "${TR[@]}" -m scripts.chat_sft --source_tag="$tag" --mixture=full --run="$WANDB_RUN" --resume=auto
  "${TR[@]}" -m scripts.chat_eval -i sft --model-tag="$tag" --online
  $PY -m nanochat.report generate
  echo "done — report at ./report.md"
}
