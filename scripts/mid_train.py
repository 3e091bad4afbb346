"""
Midtraining: teach the base model the chat format, tool use and the offline long-context tasks by
continuing training on a mixture of conversations, with the loss on assistant tokens only.

    python -m scripts.mid_train                                        # latest base model, offline mixture
    python -m scripts.mid_train --mixture full                         # + SmolTalk, MMLU aux, GSM8K (online)
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train --device_batch_size=16

Also the engine of scripts.chat_sft (same loop: other mixture, source, output folder, defaults), so
the loop lives here as run_stage(stage, argv) and both scripts call it.

What happens, top to bottom:
  1. flags, distributed init; the starting model: --source checkpoint (load_model) or, with
     --resume, this stage's own checkpoint with its optimizers, loader position and RNG (when that is
     already the final step: "already complete", exit 0)
  2. the train/val conversation mixtures (scripts pass a function split -> Task; both stages' mixtures
     live in nanochat/chat_train.py) and ChatLoaders (nanochat/chat_data.py: rows of T+1 tokens,
     targets -1 except assistant tokens)
  3. the loop: val bpb (assistant tokens) / checkpoint on token cadences, then one optimizer step of
     grad_accum micro-batches; lr warmup → flat → linear warmdown. A NaN/inf loss or gradient stops
     training with a debug checkpoint, or (--nonfinite=skip) drops that step (nanochat/training.py)
  4. a final checkpoint and a report section ("Midtraining" / "Chat SFT")

The loss of one optimizer step is the mean over every supervised token of the step (all
micro-batches, all processes), not a mean of per-micro-batch means:
    loss = Σ_{micro-batches, ranks} Σ_tokens loss_t / N,   N = global count of targets != -1
Each micro-batch backpropagates (its token-loss sum) × world_size / N; gradients are then averaged
over processes (÷ world_size) before clipping, so every split of the same rows gives the same update,
and a micro-batch with no supervised tokens adds exactly nothing (no 0/0, no NaN). A step with N = 0
(every row masked) is skipped: no optimizer update.

Cadences --eval_every and --save_every count optimizer steps when bare, as upstream (--eval_every=150),
and tokens with a unit (4M, 500K, 131072tok); -1 = off (nanochat/cadence.py). --log_every (ours) is a
token count however written. Tokens here are row slots, step × total_batch_size, with total_batch_size =
device_batch_size × max_seq_len × world × grad_accum; steps become token intervals once that is known.
The horizon is --num_iterations steps, or (-1) --num_epochs passes over the train mixture, measured by
the loader's conversation cursor (the same on every rank).

MegaContext. A checkpoint loaded with MC modules (model.mc_modules, mc/infer/checkpoint.py) keeps them:
they join the optimizers and are saved as `mc.`-prefixed weights with meta["mc_config"] and LensNet's EMAs
in meta["mc_train_state"], as in pretraining. Rows are packed (--pack defaults to 1, --pack 0 is refused:
the MC step needs a contiguous T-token history) and micro-batches whose rows are longer than the working
context W train through the same MC step as pretraining (mc.train.train_step.MCTrainStep: row ids from
the loader's row counter, the EMA commit once per optimizer step, the `mc |` log line) at the target W
(no second anneal). Its full-sequence LM term uses our targets, so it is masked to assistant tokens;
its variant term (gists -> next token) is over every token, as in MC pretraining.
"""

import argparse
import dataclasses
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from mc.infer.checkpoint import build_model
from mc.train.controller import MCController
from mc.train.train_step import MCTrainStep
from nanochat import cli_checks as ck
from nanochat.adamw import average_gradients
from nanochat.cadence import parse_cadence, to_token_intervals
from nanochat.chat_data import ChatLoader
from nanochat.chat_train import (
    mc_meta,
    mc_optimizer_params,
    mc_parts,
    micro_batch_loss,
    model_state_for_save,
    trainable_params,
)
from nanochat.checkpoint_manager import (
    SOURCE_DIRS,
    CheckpointError,
    find_last_model_tag,
    latest_step,
    load_checkpoint,
    save_checkpoint,
    step_dir,
    tag_dir,
)
from nanochat.common import (
    autocast_ctx,
    compute_cleanup,
    compute_init,
    die,
    get_base_dir,
    init_wandb,
    parse_token_count,
    print0,
    str2bool,
    synchronize,
)
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from nanochat.training import (
    CurveLog,
    NonFiniteGuard,
    all_reduce_sum,
    complete,
    crossed,
    grad_accum_steps_of,
    loss_parts,
    lr_multiplier,
    restore_rng,
    resume_problem,
    resume_step,
    rng_state,
)
from tasks.mixtures import add_mid_mixture_flags as add_mixture_flags  # the midtraining mixture
from tasks.mixtures import make_mid_task

# Per-stage defaults and names. "rows" = default rows per optimizer step (total_batch_size = rows × T).
STAGES = {
    "mid": dict(title="Midtraining", prog="mid_train", out="mid", source="base", pack=True, device_batch_size=32,
                rows=256, init_lr_frac=1.0, warmup_ratio=0.0, warmdown_ratio=0.2, eval_every="64M", eval_tokens="4M"),
    "sft": dict(title="Chat SFT", prog="chat_sft", out="sft", source="mid", pack=False, device_batch_size=4,
                rows=32, init_lr_frac=0.02, warmup_ratio=0.0, warmdown_ratio=1.0, eval_every="4M", eval_tokens="1M"),
}
# Flags whose change makes a resumed run a different experiment.
RESUME_MUST_MATCH = ("max_seq_len", "total_batch_size", "pack", "mixture", "custom_json", "seed", "embedding_lr",
                     "unembedding_lr", "matrix_lr", "init_lr_frac", "weight_decay", "source", "source_tag",
                     "num_epochs", "num_iterations")


def build_parser(stage: str, add_mixture_flags=None):
    d = STAGES[stage]
    p = argparse.ArgumentParser(description=f"{d['title']}: masked-loss training on a chat mixture.",
                                allow_abbrev=False)
    a = p.add_argument
    # runtime
    a("--run", default="dummy", help="W&B run name ('dummy' = no W&B)")
    a("--device_type", default="", help="cuda|cpu|mps (empty = autodetect)")
    a("--seed", type=int, default=42)
    a("--compile", type=str2bool, default=None, help="torch.compile the model (default: on for CUDA with --pack 1)")
    # starting point
    a("--source", default=d["source"], choices=["base", "mid", "sft"], help="checkpoint stage to start from")
    a("--source_tag", type=ck.model_tag, default="", help="model tag of the source checkpoint (default: most recent)")
    a("--source_step", type=ck.nonneg_int_or_off, default=-1, help="step of the source checkpoint (-1 = latest)")
    # data
    a("--max_seq_len", type=ck.positive_int_or_off, default=-1,
      help="row length T (-1 = the checkpoint's sequence_len)")
    a("--pack", type=str2bool, default=None,
      help=f"pack whole conversations into full rows, else one per row (default {int(d['pack'])}; 1 for MC checkpoints)")
    a("--num_epochs", type=ck.positive_float, default=1.0,
      help="passes over the train mixture (used if --num_iterations=-1)")
    # optimization
    a("--num_iterations", type=ck.positive_int_or_off, default=-1, help="optimizer steps (-1 = from --num_epochs)")
    a("--device_batch_size", type=ck.positive_int, default=d["device_batch_size"],
      help="rows per micro-batch per process")
    a("--total_batch_size", type=ck.positive_int_or_off, default=-1,
      help=f"tokens (row slots) per optimizer step, all processes (-1 = {d['rows']} rows × max_seq_len)")
    a("--embedding_lr", type=ck.nonneg_float, default=0.2)
    a("--unembedding_lr", type=ck.nonneg_float, default=0.004)
    a("--matrix_lr", type=ck.nonneg_float, default=0.02)
    a("--init_lr_frac", type=ck.nonneg_float, default=d["init_lr_frac"], help="all learning rates × this")
    a("--weight_decay", type=ck.nonneg_float, default=0.0)
    a("--grad_clip", type=ck.nonneg_float, default=1.0, help="clip the global grad norm (0 = off)")
    a("--warmup_ratio", type=ck.nonneg_float, default=d["warmup_ratio"])
    a("--warmdown_ratio", type=ck.nonneg_float, default=d["warmdown_ratio"])
    a("--final_lr_frac", type=ck.nonneg_float, default=0.0)
    # cadences: a bare integer = optimizer steps (upstream), with a unit = tokens (4M, 500K, 131072tok)
    a("--eval_every", type=parse_cadence, default=d["eval_every"],
      help="val bpb cadence (steps, or tokens: 4M; -1 = final only)")
    a("--eval_tokens", type=parse_token_count, default=parse_token_count(d["eval_tokens"]), help="tokens per val eval")
    a("--save_every", type=parse_cadence, default="-1", help="checkpoint cadence (steps, or tokens: 4M; -1 = only at the end)")
    a("--log_every", type=parse_token_count, default=0,
      help="console/W&B log cadence, in tokens even when bare (ours, not upstream's; 0 = every step)")
    # output
    a("--model_tag", type=ck.model_tag, default="", help="output checkpoint folder name (default: the source's tag)")
    a("--resume", default="", help="'' = fresh run, 'auto' = latest checkpoint of this stage if any, or a step")
    a("--keep_last", type=ck.positive_int_or_off, default=-1, help="keep only the newest N checkpoints (-1 = keep all)")
    a("--nonfinite", default="stop", choices=["stop", "skip"],
      help="a NaN/inf loss or gradient: stop (debug checkpoint, exit 2) or skip the step (no update, counted)")
    a("--debug_inject_nan_step", type=ck.nonneg_int_or_off, default=-1,
      help="testing knob: make step N's loss NaN (-1 = off)")
    if add_mixture_flags is not None:
        add_mixture_flags(p)
    return p


@dataclasses.dataclass
class Start:
    """Where a chat stage begins: the model (and tokenizer), its output folder, the source tag, and for a
    resumed run the step, the loader position, the checkpoint meta and the optimizer states."""
    model: object
    tokenizer: object
    checkpoint_dir: str
    src_tag: str
    step: int = 0
    loader_state: dict | None = None
    resumed_meta: dict | None = None
    optim_states: list | None = None


def starting_point(args, d, base_dir, device, rank, world_size, user_config) -> Start:
    """This stage's newest checkpoint per --resume (refused when its settings differ), else the source
    stage's checkpoint (--source, --source_tag, --source_step). One clear error when neither exists."""
    out_root = os.path.join(base_dir, SOURCE_DIRS[d["out"]])
    src_root = os.path.join(base_dir, SOURCE_DIRS[args.source])
    src_tag = args.source_tag
    if not src_tag and not (args.model_tag and args.resume not in ("", "none")):
        try:  # needed to load the source and to name the output; a resumed --model_tag run needs neither
            src_tag = find_last_model_tag(src_root)
        except CheckpointError as e:
            die(f"{e} (--source={args.source})")
    model_tag = args.model_tag or src_tag
    try:
        checkpoint_dir = tag_dir(out_root, model_tag, "--model_tag" if args.model_tag else "--source_tag")
    except ValueError as e:
        die(str(e))
    start_step, loader_state, resumed_meta, optim_states = 0, None, None, None
    step_to_load = resume_step(args.resume, checkpoint_dir)
    if step_to_load is not None:
        try:
            _, optim_states, resumed_meta, rank_state = load_checkpoint(
                checkpoint_dir, step_to_load, device, load_optimizer=True, rank=rank)
            model, tokenizer, _ = build_model(checkpoint_dir, step_to_load, device, phase="train")
        except (CheckpointError, FileNotFoundError) as e:
            die(str(e))
        problem = resume_problem(resumed_meta, user_config, RESUME_MUST_MATCH, world_size)
        if problem:
            die(f"cannot resume {checkpoint_dir} step {step_to_load}: {problem}")
        start_step = resumed_meta["step"]
        loader_state = rank_state["loader"]
        restore_rng(rank_state, device)
    if resumed_meta is not None:
        src_tag = resumed_meta.get("source_tag", src_tag)
    else:
        if not src_tag:
            try:
                src_tag = find_last_model_tag(src_root)
            except CheckpointError as e:
                die(f"{e} (--source={args.source})")
        try:
            src_dir = tag_dir(src_root, src_tag, "--source_tag")
        except ValueError as e:
            die(str(e))
        src_step = args.source_step if args.source_step >= 0 else latest_step(src_dir)
        if src_step is None:
            die(f"no complete checkpoint in {src_dir}; train the {args.source} stage first or pick --source_tag")
        try:
            model, tokenizer, _ = build_model(src_dir, src_step, device, phase="train")
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            die(str(e))
        print0(f"starting from {src_dir} step {src_step}")
    return Start(model, tokenizer, checkpoint_dir, src_tag, start_step, loader_state, resumed_meta, optim_states)


def run_stage(stage: str, make_task, argv=None, add_mixture_flags=None):
    """Train one chat stage. make_task(args, split) -> a Task (the mixture) for split 'train' | 'val'."""
    d = STAGES[stage]
    args = build_parser(stage, add_mixture_flags).parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    device_type = device.type
    master = rank == 0
    base_dir = get_base_dir()
    user_config = vars(args).copy()

    # The starting model: this stage's own checkpoint (resume) or the source stage's.
    start = starting_point(args, d, base_dir, device, rank, world_size, user_config)
    model, tokenizer, checkpoint_dir, src_tag = start.model, start.tokenizer, start.checkpoint_dir, start.src_tag
    start_step, loader_state, resumed_meta, optim_states = (start.step, start.loader_state, start.resumed_meta,
                                                            start.optim_states)
    orig_model = model
    mc_modules, mc_config = mc_parts(model)
    if mc_modules is not None:
        mc_modules.train()
    pack = args.pack if args.pack is not None else (mc_modules is not None or d["pack"])
    if mc_modules is not None and not pack:
        die("--pack=0 with a MegaContext checkpoint: MC rows train through the MC controller, which needs full "
            "packed rows of max_seq_len tokens (a contiguous history); drop --pack=0")

    # ----------------------------------------------------------------------------------------------
    # Batch arithmetic.
    ckpt_T = model.config.sequence_len
    T = args.max_seq_len if args.max_seq_len > 0 else ckpt_T
    if T > ckpt_T:
        die(f"--max_seq_len={T} is longer than the checkpoint's context ({ckpt_T}); use at most {ckpt_T}")
    B = args.device_batch_size
    total_batch_size = args.total_batch_size if args.total_batch_size > 0 else d["rows"] * T
    try:
        grad_accum_steps = grad_accum_steps_of(total_batch_size, B, T, world_size)
    except ValueError as e:
        die(str(e))
    cadence_line = to_token_intervals(args, total_batch_size)  # steps → tokens, now that a step's size is known
    user_config.update(eval_every=args.eval_every, save_every=args.save_every)

    # ----------------------------------------------------------------------------------------------
    # Data.
    try:
        train_task, val_task = make_task(args, "train"), make_task(args, "val")
        train_loader = ChatLoader(train_task, tokenizer, B, T, rank, world_size, device, pack, loader_state)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError, OSError) as e:
        die(f"cannot build the {stage} mixture: {e}")
    token_bytes = get_token_bytes(device=device)
    n_train = len(train_task)
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
        progress_of = lambda step: step / num_iterations
    elif args.num_epochs > 0:
        num_iterations = None  # ends when the loader's cursor has walked num_epochs passes
        progress_of = lambda step: min(train_loader.cursor / (args.num_epochs * n_train), 1.0)
    else:
        die("no training horizon: set --num_iterations or --num_epochs")
    # A stage whose final checkpoint is the one resumed says so and exits (a re-run recipe passes it in seconds);
    # with --num_epochs the end is where the resumed loader has already walked its passes.
    final_step = num_iterations or (start_step if progress_of(start_step) >= 1.0 else start_step + 1)
    if resumed_meta is not None and complete(d["prog"], checkpoint_dir, start_step, final_step):
        compute_cleanup()
        return

    # ----------------------------------------------------------------------------------------------
    # Optimizers (MC modules included), compile, MC controller.
    mc_matrix, mc_adam = mc_optimizer_params(mc_modules)
    lr_frac = args.init_lr_frac
    optimizers = orig_model.setup_optimizers(unembedding_lr=args.unembedding_lr * lr_frac,
                                             embedding_lr=args.embedding_lr * lr_frac,
                                             matrix_lr=args.matrix_lr * lr_frac, weight_decay=args.weight_decay,
                                             extra_matrix_params=mc_matrix, extra_adam_params=mc_adam,
                                             average_grads=False)  # averaged below, before clipping
    if optim_states is not None:
        for opt, state in zip(optimizers, optim_states):
            opt.load_state_dict(state)
        print0(f"resumed from {checkpoint_dir} step {start_step}")
    del optim_states
    all_params = trainable_params(orig_model)
    use_compile = args.compile if args.compile is not None else (device_type == "cuda" and pack)
    model = torch.compile(orig_model, dynamic=False) if use_compile else orig_model
    mc_step, mc_status, wc_len = None, "none (vanilla checkpoint)", None
    if mc_modules is not None:
        # The checkpoint was annealed to its working context in pretraining: train at the target W, no re-anneal.
        controller = MCController(orig_model, mc_modules, dataclasses.replace(mc_config, wc_anneal_steps=0),
                                  forward_model=model, total_steps=0, seed=args.seed)
        try:
            wc_len = controller.target_wc_length(T)
        except ValueError as e:
            die(f"the checkpoint's MegaContext config does not fit --max_seq_len={T}: {e}")
        mc_step = MCTrainStep(controller, rows_per_step=total_batch_size // T, B=B, rank=rank, world_size=world_size,
                              report_dir=os.path.join(base_dir, "report"), fail=die)
        if resumed_meta is not None:  # LensNet's EMAs (mc/train/controller.py), same on every rank
            mc_step.load_state_dict(resumed_meta.get("mc_train_state"))
        mc_status = (f"trained through MCController: micro-batches with rows longer than the working context "
                     f"W={wc_len} (packed rows of {T} tokens)")
    if mc_modules is not None:
        print0(f"MegaContext modules: {mc_status}")

    # ----------------------------------------------------------------------------------------------
    # Logging, saving.
    wandb_run = init_wandb(args.run, "nanochat-" + d["prog"], user_config, master)
    horizon = f"{num_iterations:,} steps" if num_iterations else f"{args.num_epochs} epoch(s) of {n_train:,} conversations"
    print0(f"{d['title']}: {n_train:,} train conversations, rows of {T} tokens, pack={pack}; batch "
           f"{total_batch_size:,} tokens = {B} rows × {T} × {world_size} proc × {grad_accum_steps} grad accum; {horizon}")
    print0(cadence_line)
    log_curve = CurveLog(os.path.join(base_dir, "report", f"{d['prog']}_curve.jsonl"), master, start_step).log

    def save(step, loader_state_now, directory=checkpoint_dir, extra_meta=None):
        meta = {"step": step, "model_config": vars(orig_model.config), "user_config": user_config,
                "world_size": world_size, "device_batch_size": B, "max_seq_len": T, "stage": stage,
                "val_bpb": last_val_bpb, "source": args.source, "source_tag": src_tag, **mc_meta(orig_model),
                **(extra_meta or {})}
        if mc_step is not None:
            meta["mc_train_state"] = mc_step.state_dict()
        rank_state = {"loader": loader_state_now, **rng_state(device)}
        save_checkpoint(directory, step, model_state_for_save(orig_model), [o.state_dict() for o in optimizers],
                        meta, rank=rank, world_size=world_size, extra_rank_state=rank_state,
                        keep_last_n=args.keep_last if directory == checkpoint_dir else None)
        print0(f"saved checkpoint {step_dir(directory, step)}")
        return step_dir(directory, step)

    def save_debug(step, message):  # the state before `step` (1-based), under debug/: resume never loads it
        return save(step, state_before_step, os.path.join(checkpoint_dir, "debug"), {"step": step - 1, "nonfinite": message})

    def evaluate_val():
        steps = max(1, args.eval_tokens // (B * T * world_size))
        loader = ChatLoader(val_task, tokenizer, B, T, rank, world_size, device, pack)
        model.eval()
        with autocast_ctx(device_type):
            bpb = evaluate_bpb(model, loader, steps, token_bytes)
        model.train()
        return bpb

    # ----------------------------------------------------------------------------------------------
    # The loop. Step s evaluates the model as it is after s optimizer steps, then trains step s+1.
    last_val_bpb = resumed_meta.get("val_bpb") if resumed_meta else None
    min_val_bpb = float("inf")
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)  # Σ token losses since the last log
    target_sum = torch.zeros((), device=device, dtype=torch.float64)
    supervised_total, skipped_steps, mc_rows, train_time = 0, 0, 0, 0.0
    guard = NonFiniteGuard(args.nonfinite, device, orig_model, mc_modules, args.debug_inject_nan_step)
    interval_tokens, interval_time = 0, 0.0
    model.train()
    progress = tqdm(total=num_iterations, initial=start_step, desc=d["prog"], unit="step",
                    disable=None if master else True, file=sys.stderr, mininterval=2.0, dynamic_ncols=True)
    step = start_step
    while True:
        last_step = step == num_iterations if num_iterations else progress_of(step) >= 1.0
        tokens_now = step * total_batch_size
        tokens_prev = (step - 1) * total_batch_size if step > 0 else -1
        if last_step or crossed(tokens_prev, tokens_now, args.eval_every):
            try:
                last_val_bpb = evaluate_val()
            except ValueError as e:
                die(f"validation failed: {e}. With rows of {T} tokens {train_loader.truncated} train conversations "
                    f"were cut short so far: if their answers fall past the cut, raise --max_seq_len")
            min_val_bpb = min(min_val_bpb, last_val_bpb)
            print0(f"step {step:05d} | tokens {tokens_now:,} | val bpb (assistant tokens) {last_val_bpb:.4f}")
            wandb_run.log({"step": step, "train/tokens": tokens_now, "val/bpb": last_val_bpb})
            log_curve({"step": step, "tokens": tokens_now, "val_bpb": last_val_bpb})
        state_before_step = train_loader.state_dict()
        if step > start_step and (last_step or crossed(tokens_prev, tokens_now, args.save_every)):
            save(step, state_before_step)
        if last_step:
            break

        # ---- one optimizer step ----------------------------------------------------------------
        synchronize(device_type)
        t0 = time.time()
        batches = [train_loader.next_batch() for _ in range(grad_accum_steps)]
        n_targets = sum(int((y >= 0).sum()) for _, y in batches)
        n_global = int(all_reduce_sum(torch.tensor(n_targets, device=device, dtype=torch.float64)).item())
        if n_global == 0:
            skipped_steps += 1
            print0(f"step {step + 1}: no supervised tokens in any row (all targets masked); skipping the update")
        else:
            step_loss, parts = torch.zeros((), device=device, dtype=torch.float64), None
            for k, (x, y) in enumerate(batches):
                if mc_step is not None and x.size(1) > wc_len:
                    # the MC step's loss is a mean (full-sequence LM loss over y's targets + variant loss):
                    # weight it by this micro-batch's share of the step's supervised tokens
                    n_k = int((y >= 0).sum())
                    mc_loss, lm_loss = mc_step(x, y, step, k, step_first_row=state_before_step["rows"])
                    if k + 1 < len(batches) and batches[k + 1][0].size(1) > wc_len:  # --mc_async: lay out the
                        mc_step.prefetch(*batches[k + 1], step, k + 1,  # next one during this backward
                                         step_first_row=state_before_step["rows"])
                    loss = mc_loss * (n_k * world_size / n_global)
                    token_loss_sum = lm_loss * n_k
                    mc_rows, parts = mc_rows + x.size(0), loss_parts(mc_step.last_result.metrics)
                else:
                    with autocast_ctx(device_type):
                        loss, token_loss_sum = micro_batch_loss(model, x, y, n_global, world_size)
                loss = guard.poison(loss, step + 1, k)
                guard.watch(k, loss, parts)
                step_loss += token_loss_sum.double()
                loss.backward()
            if ddp:
                # Average gradients across processes before clipping: the clip sees the global gradient.
                average_gradients(all_params)
            if guard.check(step + 1, all_params, args.grad_clip, save_debug):  # finite → clip; else stop or skip
                loss_sum += step_loss
                target_sum += n_targets
                supervised_total += n_global
                lrm = lr_multiplier(progress_of(step), args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = group["initial_lr"] * lrm
                    opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        synchronize(device_type)
        dt = time.time() - t0
        if step - start_step > 1:
            train_time += dt
        interval_tokens += total_batch_size
        interval_time += dt
        progress.update(1)
        step += 1

        tokens_after = step * total_batch_size
        done = step == num_iterations if num_iterations else progress_of(step) >= 1.0
        if args.log_every <= 0 or crossed(tokens_now, tokens_after, args.log_every) or done:
            sums = all_reduce_sum(torch.stack([loss_sum, target_sum]))
            if sums[1].item() > 0:
                train_loss = (sums[0] / sums[1]).item()
                if not math.isfinite(train_loss):
                    die(f"non-finite training loss {train_loss} at step {step}; lower the learning rates or check the data")
                tok_per_sec = interval_tokens / max(interval_time, 1e-9)
                line = (f"step {step:05d}{'/' + str(num_iterations) if num_iterations else ''} | loss {train_loss:.4f} | "
                        f"epoch {train_loader.cursor / n_train:.3f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f}")
                metrics = {"step": step, "train/loss": train_loss, "train/tokens": tokens_after,
                           "train/tok_per_sec": tok_per_sec, "train/epoch": train_loader.cursor / n_train,
                           "train/supervised_tokens": supervised_total, "train/tokens_per_step": total_batch_size}
                if mc_step is not None:  # + the "mc |" line, as in MC pretraining
                    mc_metrics, mc_line = mc_step.log(step, dt * 1000, grad_accum_steps)
                    metrics.update(mc_metrics)
                    line += "\n" + mc_line
                if master:
                    tqdm.write(line)
                wandb_run.log(metrics)
                log_curve({"step": step, "tokens": tokens_after, "train_loss": train_loss})
            loss_sum.zero_()
            target_sum.zero_()
            interval_tokens, interval_time = 0, 0.0
    progress.close()
    if mc_step is not None:
        mc_step.close()

    # ----------------------------------------------------------------------------------------------
    timed_steps = max(step - start_step - 2, 1)
    summary = {
        "Source": f"{args.source}/{src_tag}", "Output": checkpoint_dir, "Max seq len": T, "Packed rows": pack,
        "Train conversations": n_train, "Epochs": round(train_loader.cursor / n_train, 3),
        "Iterations": step, "Total batch size": total_batch_size, "Grad accum steps": grad_accum_steps,
        "World size": world_size, "Training tokens (row slots)": step * total_batch_size,
        "Supervised tokens (this run)": supervised_total, "Skipped all-masked steps": skipped_steps,
        "Skipped non-finite steps": guard.skipped,
        "Truncated conversations (this rank)": train_loader.truncated,
        "Final val bpb": last_val_bpb, "Minimum val bpb": min_val_bpb if min_val_bpb < float("inf") else None,
        "MegaContext": mc_status, "MC rows": mc_rows,
        "Mean step time (s)": round(train_time / timed_steps, 4) if train_time else None,
        "Training time (min)": round(train_time / 60, 2),
    }
    print0("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    get_report().log(section=d["title"], data=[user_config, summary,
                                               "val bpb = bits per byte of the assistant tokens of the val mixture."])
    wandb_run.finish()
    compute_cleanup()


def main(argv=None):
    run_stage("mid", make_mid_task, argv, add_mixture_flags)


if __name__ == "__main__":
    main()
