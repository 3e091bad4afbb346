# Shared by the recipes. run10.sh uses the helpers below; speedrun.sh and run1000.sh also use run_recipe
# (the 8-GPU body; expects DEPTH, SHARDS, DEVICE_BATCH).
#
# Re-running a recipe continues it: training stages get --resume=auto (a finished stage says "already
# complete" and exits at once), and the helpers below skip the tokenizer and every eval whose output is
# already there for the newest checkpoint, each with a line "skip <stage>: <why>". --fresh starts over.

# tokenizer_ready VOCAB [SOURCE]: the tokenizer is saved and has exactly VOCAB ids (else it gets retrained);
# with SOURCE ("synthetic", "fineweb", "dir /abs/folder"), it was also trained on that text, as its
# trained_on.txt says. A tokenizer from before trained_on.txt existed counts as trained on any corpus but a folder.
tokenizer_ready() {
  local dir="$NANOCHAT_BASE_DIR/tokenizer" have on
  [ -f "$dir/tokenizer.pkl" ] && [ -f "$dir/token_bytes.pt" ] || return 1
  have=$($PY -c 'from nanochat.tokenizer import get_tokenizer; print(get_tokenizer().get_vocab_size())' 2>/dev/null) || return 1
  if [ "$have" != "$1" ]; then echo "tokenizer: $dir has $have ids, $1 requested: training a new one"; return 1; fi
  if [ -n "${2:-}" ]; then
    on=$(cat "$dir/trained_on.txt" 2>/dev/null || true)
    if { [ -n "$on" ] && [ "$on" != "$2" ]; } || { [ -z "$on" ] && [ "${2#dir }" != "$2" ]; }; then
      echo "tokenizer: $dir was trained on ${on:-an unrecorded corpus}, this run reads $2: training a new one"; return 1
    fi
  fi
  echo "skip tokenizer: $dir already has the requested $1 ids${2:+ (trained on $2)}"
}

# latest_ckpt DIR: the newest complete step in a checkpoint folder (a step_N folder with meta.json), or nothing
latest_ckpt() {
  local d n best=""
  for d in "$1"/step_*; do
    n=${d##*/step_}
    case "$n" in ''|*[!0-9]*) continue ;; esac
    [ -f "$d/meta.json" ] || continue
    n=$((10#$n))
    if [ -z "$best" ] || [ "$n" -gt "$best" ]; then best=$n; fi
  done
  echo "$best"
}

# newer NAME FILE INPUT: true (saying "skip NAME: …") when FILE exists and was written after INPUT
newer() {
  [ -f "$2" ] && [ -e "$3" ] && [ "$2" -nt "$3" ] || return 1
  echo "skip $1: $2 is newer than $3"
}

# evaluated NAME FILE CKPT_DIR: true (saying "skip NAME: …") when FILE, a report section or an eval's JSON,
# names the model tag of CKPT_DIR and was written after its newest complete checkpoint
evaluated() {
  local tag=${3##*/} step
  step=$(latest_ckpt "$3")
  [ -n "$step" ] && [ -f "$2" ] && grep -qE "[Mm]odel[_ ]tag\"?: \"?${tag}(\"|\$)" "$2" || return 1
  newer "$1" "$2" "$(printf '%s/step_%06d/meta.json' "$3" "$step")"
}

# report_reset FRESH: a new report unless one is in progress (re-runs keep the sections of skipped stages)
report_reset() {
  if [ "$1" = 1 ] || [ ! -f "$NANOCHAT_BASE_DIR/report/header.md" ]; then
    $PY -m nanochat.report reset
  else
    echo "skip report reset: continuing $NANOCHAT_BASE_DIR/report (--fresh starts a new one)"
  fi
}

# start_fresh TAG: delete the checkpoints a re-run would resume (base, mid, SFT, RL of this model tag)
start_fresh() {
  local d
  # the tag becomes part of an rm -rf path: only plain folder names (what the Python scripts accept too)
  case "$1" in ''|.*|*..*|*[!A-Za-z0-9_.-]*) echo "error: --model_tag='$1' is not a plain folder name (letters, digits, _ - .; no '..' or '/')" >&2; exit 2 ;; esac
  for d in base_checkpoints mid_checkpoints chatsft_checkpoints chatrl_checkpoints; do
    if [ -d "$NANOCHAT_BASE_DIR/$d/$1" ]; then
      echo "--fresh: deleting $NANOCHAT_BASE_DIR/$d/$1"
      rm -rf "${NANOCHAT_BASE_DIR:?}/$d/$1"
    fi
  done
}

run_recipe() {
  local profile=baseline fresh=0 extra=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --profile) profile="$2"; shift ;;
      --profile=*) profile="${1#*=}" ;;
      --mc) profile=mc ;;
      --fresh) fresh=1 ;;
      --) shift; extra=("$@"); break ;;
      *) echo "unknown option $1 (--profile baseline|mc, --fresh, or -- then base_train flags)" >&2; exit 2 ;;
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
  [ "$fresh" = 1 ] && start_fresh "$tag"
  report_reset "$fresh"
  local R="$NANOCHAT_BASE_DIR/report" T="$NANOCHAT_BASE_DIR/tokenizer"
  { [ "$fresh" = 0 ] && tokenizer_ready 65536; } || $PY -m scripts.tok_train --source=fineweb --vocab_size=65536 --max_chars=2000000000
  newer tok_eval "$R/tokenizer-evaluation.md" "$T/tokenizer.pkl" || $PY -m scripts.tok_eval --source=fineweb
  wait "$download_pid" || { echo "shard download failed: see $NANOCHAT_BASE_DIR/dataset_download.log" >&2; exit 1; }
  .venv/bin/torchrun --standalone --nproc_per_node="$nproc" -m scripts.base_train \
    --depth="$DEPTH" --device_batch_size="$DEVICE_BATCH" --source=fineweb --run="$WANDB_RUN" --resume=auto \
    --eval_every=128M --sample_every=1B --save_every=1B --core_metric_every=2B ${mc_args[@]+"${mc_args[@]}"} ${extra[@]+"${extra[@]}"}
  local TR=(.venv/bin/torchrun --standalone --nproc_per_node="$nproc") C="$NANOCHAT_BASE_DIR"
  evaluated base_loss "$R/base-model-loss.md" "$C/base_checkpoints/$tag" ||
    "${TR[@]}" -m scripts.base_loss --source=fineweb --device_batch_size="$DEVICE_BATCH" --model_tag="$tag"
  evaluated base_eval "$R/base-model-evaluation.md" "$C/base_checkpoints/$tag" ||
    "${TR[@]}" -m scripts.base_eval --bundle=official --model_tag="$tag"
  if [ "$profile" = mc ]; then
    evaluated mc_eval "$R/mc_eval.json" "$C/base_checkpoints/$tag" ||
      "${TR[@]}" -m scripts.mc_eval --model_tag="$tag" --num_docs=256 --probe_multipliers=4,16 --out="$R/mc_eval.json"
  fi
  # chat half: midtraining and SFT on the full (online) mixtures, each followed by chat eval
  "${TR[@]}" -m scripts.mid_train --source_tag="$tag" --mixture=full --run="$WANDB_RUN" --resume=auto --device_batch_size="$DEVICE_BATCH"
  evaluated "chat_eval mid" "$R/chat-evaluation-mid.md" "$C/mid_checkpoints/$tag" ||
    "${TR[@]}" -m scripts.chat_eval -i mid --model-tag="$tag" --online
  "${TR[@]}" -m scripts.chat_sft --source_tag="$tag" --mixture=full --run="$WANDB_RUN" --resume=auto
  evaluated "chat_eval sft" "$R/chat-evaluation-sft.md" "$C/chatsft_checkpoints/$tag" ||
    "${TR[@]}" -m scripts.chat_eval -i sft --model-tag="$tag" --online
  # RL on GSM8K (upstream's last stage: REINFORCE on the SFT model, one pass over the train split), then
  # its chat eval on GSM8K. SKIP_RL=1 ends the recipe after SFT.
  if [ "${SKIP_RL:-0}" != 1 ]; then
    "${TR[@]}" -m scripts.chat_rl --task=gsm8k --source_tag="$tag" --run="$WANDB_RUN" --resume=auto
    evaluated "chat_eval rl" "$R/chat-evaluation-rl.md" "$C/chatrl_checkpoints/$tag" ||
      "${TR[@]}" -m scripts.chat_eval -i rl --model-tag="$tag" --online -a GSM8K
  fi
  $PY -m nanochat.report generate
  echo "done — report at ./report.md"
}
