#!/usr/bin/env bash
# The single-machine recipe: tokenizer → base pretraining → base loss/eval → midtraining → chat eval
# → chat SFT → chat eval → chat RL → chat eval → report (+ the long-context eval, mc_eval, for --profile mc).
# RL: GSM8K with --source fineweb, the offline recall task otherwise; SKIP_RL=1 stops after SFT.
#
#   bash run10.sh --gpu cpu                 # offline, 2 CPU cores, ~10 minutes, synthetic corpus
#   bash run10.sh --gpu 4090|5090|h100      # one rented GPU, 24 / 32 / 80 GB (default h100)
#   bash run10.sh --gpu 4090 --dry_run      # will it fit? the memory estimate of the training step, then stop
#   bash run10.sh --gpu h100 --source fineweb --shards 24   # real web text (downloads shards first)
#   bash run10.sh --gpu cpu --data_dir ~/books               # your own .txt/.jsonl/.parquet files
#   bash run10.sh ... -- --depth=8          # anything after -- goes to scripts.base_train
#
#   bash run10.sh --gpu h100 --profile mc --quality   # the long-range quality run: tokenizer → MC base
#                                           # training sized for ~10 GPU minutes → mc_eval (no chat half)
#   bash run10.sh --gpu cpu --profile mc --recall     # the recall recipe: a tiny GPT with the recall options
#                                           # on the dense recall corpus (--source recall) → mc_eval (no chat half)
#
# Options: --gpu cpu|4090|5090|h100, --profile baseline|mc (or --mc), --quality, --recall, --source synthetic|fineweb,
#          --data_dir PATH (your own text: tokenizer, base training and base loss read it; implies --source dir),
#          --shards N (FineWeb shards to download), --run NAME (W&B; default $WANDB_RUN or dummy),
#          --fresh (start over: new report, new tokenizer, delete this tag's base/mid/SFT/RL checkpoints),
#          --dry_run (print the memory estimate and the MC batch plan, scripts/memory_plan.py, and stop).
# Re-running the same command continues where it stopped: every training stage resumes from its newest
# complete checkpoint (--resume=auto; a finished one says "already complete" and exits at once), and the
# tokenizer and the evals whose outputs exist for the newest checkpoint are skipped ("skip <stage>: why").
# --profile mc trains with MegaContext (--mc_enabled=1, GistNet + working-context variants) into its
# own checkpoint folder (base_checkpoints/d<depth>_mc), so baseline checkpoints are never touched.
set -euo pipefail
CALLER_DIR=$PWD  # a relative --data_dir is relative to where run10.sh was started, not to the repo
cd "$(dirname "$0")"
source dev/recipe_common.sh  # the skip/resume helpers (tokenizer_ready, evaluated, newer, report_reset, ...)

GPU=h100
PROFILE=baseline
SOURCE=synthetic
SOURCE_SET=0
DATA_DIR=
SHARDS=24
QUALITY=0
RECALL=0
FRESH=0
DRY_RUN=0
GPU_MEMORY=
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) GPU="$2"; shift ;;
    --gpu=*) GPU="${1#*=}" ;;
    --profile) PROFILE="$2"; shift ;;
    --profile=*) PROFILE="${1#*=}" ;;
    --mc) PROFILE=mc ;;
    --quality) QUALITY=1 ;;
    --recall) RECALL=1 ;;
    --source) SOURCE="$2"; SOURCE_SET=1; shift ;;
    --source=*) SOURCE="${1#*=}"; SOURCE_SET=1 ;;
    --data_dir) [ $# -ge 2 ] || { echo "run10.sh: --data_dir needs a folder" >&2; exit 2; }; DATA_DIR="$2"; shift ;;
    --data_dir=*) DATA_DIR="${1#*=}" ;;
    --shards) SHARDS="$2"; shift ;;
    --run) export WANDB_RUN="$2"; shift ;;
    --fresh) FRESH=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "run10.sh: unknown option $1 (see bash run10.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$PROFILE" in
  baseline|mc) ;;
  *) echo "run10.sh: unknown --profile $PROFILE (baseline|mc)" >&2; exit 2 ;;
esac
if [ "$QUALITY" = 1 ] && [ "$RECALL" = 1 ]; then
  echo "run10.sh: --quality and --recall are two different long-range recipes; pick one" >&2; exit 2
fi
# --data_dir: your own text, source "dir" (nanochat/dataset.py). The long-range recipes need their own corpora.
if [ -n "$DATA_DIR" ]; then
  if [ "$SOURCE_SET" = 1 ] && [ "$SOURCE" != dir ]; then
    echo "run10.sh: --data_dir trains on your own files (source dir), --source $SOURCE on another corpus; drop one" >&2; exit 2
  fi
  [ "$RECALL" = 0 ] || { echo "run10.sh: --recall trains on the built-in recall corpus; drop --data_dir" >&2; exit 2; }
  [ "$QUALITY" = 0 ] || { echo "run10.sh: --quality runs on the synthetic corpus (its recalls are annotated); drop --data_dir" >&2; exit 2; }
  DATA_DIR=${DATA_DIR/#\~/$HOME}  # --data_dir=~/x: the shell leaves that ~ alone
  case "$DATA_DIR" in /*) ;; *) DATA_DIR="$CALLER_DIR/$DATA_DIR" ;; esac
  [ -d "$DATA_DIR" ] || { echo "run10.sh: --data_dir $DATA_DIR is not a folder" >&2; exit 2; }
  DATA_DIR=$(cd "$DATA_DIR" && pwd -P)  # absolute and canonical: what tok_train records in trained_on.txt
  SOURCE=dir
elif [ "$SOURCE" = dir ]; then
  echo "run10.sh: --source dir reads your own files: add --data_dir PATH" >&2; exit 2
fi
if [ "$RECALL" = 1 ]; then
  [ "$SOURCE" = synthetic ] || { echo "run10.sh: --recall trains on the built-in recall corpus; drop --source" >&2; exit 2; }
fi
if [ "$QUALITY" = 1 ]; then
  [ "$PROFILE" = mc ] || { echo "run10.sh: --quality measures MegaContext; add --profile mc" >&2; exit 2; }
  [ "$SOURCE" = synthetic ] || { echo "run10.sh: --quality runs on the synthetic corpus (its recalls are annotated)" >&2; exit 2; }
fi

[ -f .mc_env ] && source .mc_env
export WANDB_RUN=${WANDB_RUN:-dummy}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$( [ "$GPU" = cpu ] && nproc || echo 1 )}

# The synthetic corpus has a closed word list: BPE runs out of merges near 2,300 tokens, so a
# 65,536 vocabulary would be 97% padding. Real web text gets the full vocabulary.
GPU_VOCAB=$( [ "$SOURCE" = synthetic ] && echo 2048 || echo 65536 )

# Per-hardware sizes. Every profile keeps total_batch_size fixed per step; device_batch_size only
# changes how it is split into micro-batches (grad accumulation), never what the model sees.
# Cadences: a bare integer counts steps (as upstream), a unit makes it tokens (64M, 655360tok).
case "$GPU" in
  cpu)
    SETUP=--cpu
    # ~4k tok/s on 2 cores: 240 steps × 8,192 tokens ≈ 2M tokens ≈ 8 minutes of training.
    TOK_ARGS=(--vocab_size=2048 --max_chars=20000000)
    TRAIN_ARGS=(--device_type=cpu --depth=4 --aspect_ratio=64 --head_dim=64 --max_seq_len=512
                --device_batch_size=8 --total_batch_size=8192 --num_iterations=240
                --embedding_lr=0.05 --warmup_ratio=0.02
                --eval_every=655360tok --eval_tokens=65536 --sample_every=1M --save_every=655360tok --log_every=81920tok)
    EVAL_ARGS=(--device_type=cpu)
    LOSS_ARGS=(--device_type=cpu --device_batch_size=8 --split_tokens=65536)
    # chat half, ~4 minutes: 60 midtraining steps, 30 SFT steps, 40 problems per chat-eval task
    MID_ARGS=(--device_type=cpu --device_batch_size=8 --total_batch_size=8192 --num_iterations=60
              --eval_every=245760tok --eval_tokens=32768 --log_every=81920tok)
    SFT_ARGS=(--device_type=cpu --device_batch_size=8 --total_batch_size=8192 --num_iterations=30
              --eval_every=122880tok --eval_tokens=32768 --log_every=40960tok)
    CHAT_EVAL_ARGS=(--device-type=cpu --max-problems=40 --max-new-tokens=48)
    # RL, ~2 minutes: 8 steps of 8 questions x 4 rollouts on the offline recall task
    RL_ARGS=(--device_type=cpu --train_examples=64 --examples_per_step=8 --num_samples=4 --max_new_tokens=32
             --device_batch_size=8 --eval_examples=16 --eval_samples=2 --recall_context_chars=800)
    MC_EVAL_ARGS=(--device_type=cpu --num_docs=16 --num_probes=32 --n_boot=500)
    # MC on 2 cores: a step costs ~2.2x a vanilla one (LM forward + 3 working contexts of ~W entries +
    # GistNet), so half the steps (same tokens per step, same cadences) keep the run near 15 minutes.
    # T=512 has no LOD2 unit (that needs 1024 + R tokens); memory is no issue on CPU: no auto-batch.
    MC_ARGS=(--num_iterations=120 --mc_num_random_variants=2 --mc_train_wc_length=0.25 --mc_wc_anneal_start_frac=0.5
             --allocator_recent_tokens=64 --gistnet_layers=1 --mc_auto_batch=0)
    MC_TAG=d4_mc
    ;;
  4090|5090|h100)
    # One card: d12 at T=2048. device_batch_size is the largest that the memory dry run (scripts/memory_plan.py,
    # checked below before anything runs) fits with the 65,536-token vocabulary in eager mode (torch.compile
    # saves less, so the estimate errs high): 24 GB → 4 rows, 32 GB → 8, 80 GB → 16. total_batch_size is the
    # same on every card, so the three train the same model; a smaller card just accumulates more micro-batches.
    case "$GPU" in
      4090) GPU_MEMORY=23.9; DBS=4 ;;
      5090) GPU_MEMORY=31.8; DBS=8 ;;
      h100) GPU_MEMORY=79; DBS=16 ;;
    esac
    SETUP=--gpu
    TOK_ARGS=(--vocab_size="$GPU_VOCAB" --max_chars=2000000000)
    TRAIN_ARGS=(--depth=12 --max_seq_len=2048 --device_batch_size="$DBS" --total_batch_size=524288
                --eval_every=64M --eval_tokens=4M --sample_every=256M --save_every=256M)
    EVAL_ARGS=(--max_per_task=500)
    LOSS_ARGS=(--device_batch_size="$DBS")
    MID_ARGS=(--device_batch_size="$DBS")
    SFT_ARGS=(--device_batch_size="$DBS")
    CHAT_EVAL_ARGS=(--max-problems=500)
    RL_ARGS=()
    MC_EVAL_ARGS=(--num_docs=64 --num_probes=64 --probe_multipliers=4,16)
    # MC: 4 variants + the recency baseline per row, W anneals 0.8 -> 0.2 of T; auto-batch shrinks the
    # micro-batch (and raises grad accumulation) so steps train on the baseline's exact rows.
    MC_ARGS=(--mc_num_random_variants=4 --mc_train_wc_length=0.2 --allocator_recent_tokens=128 --mc_auto_batch=1)
    MC_TAG=d12_mc
    ;;
  *) echo "run10.sh: unknown --gpu $GPU (cpu|4090|5090|h100)" >&2; exit 2 ;;
esac
[ "$DRY_RUN" = 1 ] || ./mc_setup "$SETUP"
if [ "$QUALITY" = 1 ]; then
  # The long-range question (DESIGN.md): does FULL attention learn to retrieve facts on the synthetic
  # corpus (mc_eval's validity bar), and how much of the FULL-RECENCY gap do gists recover at W = T/4?
  # Tiny CPU models never formed a recall circuit in tens of minutes, so the sizes target a GPU:
  # depth 8 (width 512), T=1024, 2,500 steps × 262,144 tokens ≈ 655M tokens (≈ 10 min estimated on one
  # H100 with MC's ~2.3× step cost; not yet measured). On CPU the same recipe runs for as long as you
  # let it: pass -- --num_iterations=N (each step ≈ 30-60 s on 2 cores).
  QBATCH=$( [ "$GPU" = cpu ] && echo 8 || echo 32 )
  TRAIN_ARGS=(--depth=8 --aspect_ratio=64 --head_dim=64 --max_seq_len=1024 --device_batch_size="$QBATCH"
              --total_batch_size=262144 --num_iterations=2500 --warmup_ratio=0.01
              --eval_every=65M --eval_tokens=1M --sample_every=-1 --save_every=131M)
  [ "$GPU" = cpu ] && TRAIN_ARGS+=(--device_type=cpu --total_batch_size=32768 --num_iterations=2000 --eval_every=8M --eval_tokens=131072 --save_every=8M)
  MC_ARGS=(--mc_num_random_variants=4 --mc_train_wc_length=0.25 --mc_wc_anneal_start_frac=0.6
           --allocator_recent_tokens=64 --mc_auto_batch=1)
  MC_TAG=d8_mc_quality
  MC_EVAL_ARGS+=(--mc_eval_wc_length=256 --num_docs=64 --num_probes=64 --probe_multipliers=4)
fi
TOK_SOURCE=$SOURCE
if [ "$RECALL" = 1 ]; then
  # The recall recipe (lab notebook, 2026-12-07 "the learning rate was the lever"): the dense recall
  # corpus with the loss on the answers, a 4-token previous mix, a learned query gain and partial RoPE on
  # a 2-layer, width-128 GPT, T=512 (W = 128: probes at 4W = 512 and 16W = 2048), at 0.3x the default
  # learning rates: at the defaults the lookup circuit never formed while the LR was at its peak.
  # The tokenizer stays the story corpus's (the recall corpus is a subset of its vocabulary).
  # MC on top (a second command): --profile mc --recall warm-starts GistNet + LensNet on d2_recall; LensNet
  # reads the content match (--lensnet_match=1, mc/lensnet.py: without it 0.00 at 16W, with it 0.97). One of
  # the two variants is LensNet's proposal (--mc_priority_variants=1; lab notebook 2026-12-07 session 4:
  # passkeys at 16W 1.00 on four evaluation seeds against 0.91-0.94 with random variants, equal compute).
  SOURCE=recall
  TOK_SOURCE=synthetic
  TRAIN_ARGS=(--depth=2 --aspect_ratio=64 --head_dim=32 --max_seq_len=512 --prev_token_mix=4 --query_gain=4
              --rope_fraction=0.5 --device_batch_size=8 --total_batch_size=4096 --num_iterations=2000
              --matrix_lr=0.006 --embedding_lr=0.015 --unembedding_lr=0.0012
              --eval_every=1M --eval_tokens=65536 --sample_every=-1 --save_every=1M
              --log_every=204800tok --model_tag=d2_recall)
  [ "$GPU" = cpu ] && TRAIN_ARGS+=(--device_type=cpu)
  MC_ARGS=(--init_from=d2_recall --num_iterations=400 --warmdown_ratio=0.99
           --mc_num_random_variants=2 --mc_train_wc_length=0.25 --mc_wc_anneal_start_frac=0.5
           --allocator_recent_tokens=64 --gistnet_layers=1 --mc_auto_batch=0 --lensnet_match=1
           --mc_priority_variants=1)
  MC_TAG=d2_recall_mc
  MC_EVAL_ARGS+=(--num_docs=16 --num_probes=32 --num_assoc=8 --probe_multipliers=4,16 --n_boot=500)
  QUALITY=1  # evaluation only: the chat half needs a model that talks, this one only recalls
fi
PY=.venv/bin/python
TAG=d$(for a in "${TRAIN_ARGS[@]}"; do case "$a" in --depth=*) echo "${a#*=}" ;; esac; done)
for a in "${TRAIN_ARGS[@]}"; do case "$a" in --model_tag=*) TAG="${a#*=}" ;; esac; done
if [ "$PROFILE" = mc ]; then
  for a in ${EXTRA[@]+"${EXTRA[@]}"}; do case "$a" in --model_tag=*) MC_TAG="${a#*=}" ;; esac; done
  # MC flags go after the profile's, so they override it (e.g. --num_iterations on CPU); flags after --
  # still override everything. The MC checkpoints get their own tag, which the eval steps then read.
  TRAIN_ARGS+=(--mc_enabled=1 --model_tag="$MC_TAG" "${MC_ARGS[@]}")
  TAG=$MC_TAG
fi
for a in ${EXTRA[@]+"${EXTRA[@]}"}; do case "$a" in --model_tag=*) TAG="${a#*=}" ;; esac; done
LOSS_ARGS+=(--model_tag="$TAG")  # the evals read the model this run trained
EVAL_ARGS+=(--model_tag="$TAG")
VOCAB=$(for a in "${TOK_ARGS[@]}"; do case "$a" in --vocab_size=*) echo "${a#*=}" ;; esac; done)

# The memory dry run (scripts/memory_plan.py): on a GPU preset the training step (flags after -- included) is
# estimated on the CPU before anything runs; one that would not fit stops here, naming a --device_batch_size
# that would, instead of running out of memory minutes in. --dry_run prints the estimate and stops (no setup,
# no training; on --gpu cpu against this machine's RAM). SKIP_MEMORY_CHECK=1 trains anyway: the estimate
# is eager-mode and errs high under torch.compile.
if [ -n "$GPU_MEMORY" ] || [ "$DRY_RUN" = 1 ]; then
  [ -x "$PY" ] || { echo "run10.sh: the memory dry run needs the venv: run ./mc_setup --cpu (or --gpu) first" >&2; exit 2; }
  MEMORY=${GPU_MEMORY:-$(awk '/MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo 2>/dev/null)}
  [ -n "$MEMORY" ] || { echo "run10.sh: cannot read this machine's RAM (/proc/meminfo) for the --gpu cpu dry run" >&2; exit 2; }
  if ! $PY -m scripts.memory_plan --gpu_memory="$MEMORY" --vocab_size="$VOCAB" "${TRAIN_ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}; then
    if [ "$DRY_RUN" = 1 ] || [ "${SKIP_MEMORY_CHECK:-0}" != 1 ]; then
      echo "run10.sh: this run does not fit --gpu $GPU by the memory estimate above; pass -- --device_batch_size=N" \
           "(total_batch_size stays, so the model trained is the same), or SKIP_MEMORY_CHECK=1 to try anyway" >&2
      exit 1
    fi
  fi
  [ "$DRY_RUN" = 1 ] && exit 0
fi

if [ "$SOURCE" = fineweb ]; then
  $PY -m nanochat.dataset -n "$SHARDS"
fi
DATA_ARGS=()  # the stages that read the pretraining text get the folder too
TOK_RECORD=$TOK_SOURCE  # what tokenizer/trained_on.txt must say for the tokenizer to be reused
if [ -n "$DATA_DIR" ]; then DATA_ARGS=(--data_dir="$DATA_DIR"); TOK_RECORD="dir $DATA_DIR"; fi

# Each stage runs unless its output is already there (see dev/recipe_common.sh); trainers resume themselves.
R=$NANOCHAT_BASE_DIR/report
C=$NANOCHAT_BASE_DIR
[ "$FRESH" = 1 ] && start_fresh "$TAG"
report_reset "$FRESH"
{ [ "$FRESH" = 0 ] && tokenizer_ready "$VOCAB" "$TOK_RECORD"; } ||
  $PY -m scripts.tok_train --source="$TOK_SOURCE" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} "${TOK_ARGS[@]}"
newer tok_eval "$R/tokenizer-evaluation.md" "$C/tokenizer/tokenizer.pkl" ||
  $PY -m scripts.tok_eval --source="$TOK_SOURCE" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}
$PY -m scripts.base_train --run="$WANDB_RUN" --source="$SOURCE" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} --resume=auto \
  "${TRAIN_ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
evaluated base_loss "$R/base-model-loss.md" "$C/base_checkpoints/$TAG" ||
  $PY -m scripts.base_loss --source="$SOURCE" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} "${LOSS_ARGS[@]}"
evaluated base_eval "$R/base-model-evaluation.md" "$C/base_checkpoints/$TAG" || $PY -m scripts.base_eval "${EVAL_ARGS[@]}"
if [ "$PROFILE" = mc ] || [ "$RECALL" = 1 ]; then  # the recall recipe evaluates its baseline too
  evaluated mc_eval "$R/mc_eval.json" "$C/base_checkpoints/$TAG" ||
    $PY -m scripts.mc_eval --model_tag="$TAG" --out="$R/mc_eval.json" "${MC_EVAL_ARGS[@]}"
fi
if [ "$QUALITY" = 1 ]; then
  $PY -m nanochat.report generate
  echo "run10.sh: quality run done — mc_eval JSON at $NANOCHAT_BASE_DIR/report/mc_eval.json (see its 'valid' field)"
  exit 0
fi
# The chat half. The offline default mixtures are synthetic (long-context recall questions, spelling,
# identity); `--source fineweb` runs on a networked machine use the full mixtures and the standard tasks.
# Your own text (--data_dir) may be on an offline machine: it keeps the offline mixtures.
MIXTURE=$( [ "$SOURCE" = fineweb ] && echo full || echo offline )
ONLINE=$( [ "$SOURCE" = fineweb ] && echo --online || echo "" )
$PY -m scripts.mid_train --run="$WANDB_RUN" --source_tag="$TAG" --mixture="$MIXTURE" --resume=auto "${MID_ARGS[@]}"
evaluated "chat_eval mid" "$R/chat-evaluation-mid.md" "$C/mid_checkpoints/$TAG" ||
  $PY -m scripts.chat_eval -i mid --model-tag="$TAG" $ONLINE "${CHAT_EVAL_ARGS[@]}"
$PY -m scripts.chat_sft --run="$WANDB_RUN" --source_tag="$TAG" --mixture="$MIXTURE" --resume=auto "${SFT_ARGS[@]}"
evaluated "chat_eval sft" "$R/chat-evaluation-sft.md" "$C/chatsft_checkpoints/$TAG" ||
  $PY -m scripts.chat_eval -i sft --model-tag="$TAG" $ONLINE "${CHAT_EVAL_ARGS[@]}"
# RL (upstream's last stage): REINFORCE on the SFT model; GSM8K with --source fineweb, the offline recall
# task otherwise; then the chat eval of the RL model. SKIP_RL=1 ends the recipe after SFT.
if [ "${SKIP_RL:-0}" != 1 ]; then
  RL_TASK=$( [ "$SOURCE" = fineweb ] && echo gsm8k || echo synthetic )
  $PY -m scripts.chat_rl --run="$WANDB_RUN" --task="$RL_TASK" --source_tag="$TAG" --resume=auto \
    ${RL_ARGS[@]+"${RL_ARGS[@]}"}
  evaluated "chat_eval rl" "$R/chat-evaluation-rl.md" "$C/chatrl_checkpoints/$TAG" ||
    $PY -m scripts.chat_eval -i rl --model-tag="$TAG" $ONLINE "${CHAT_EVAL_ARGS[@]}"
fi
$PY -m nanochat.report generate
CHAT_STAGE=$( [ "${SKIP_RL:-0}" != 1 ] && echo rl || echo sft )
echo "run10.sh: done — report at ./report.md; chat with: $PY -m scripts.chat_cli -i $CHAT_STAGE -g $TAG"
