"""
Pretrain the base model: next-token prediction on a stream of documents.

    python -m scripts.base_train --depth=4 --max_seq_len=512                  # one process
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth=20  # one node, 8 GPUs

What happens, top to bottom:
  1. flags, distributed init, tokenizer, model (depth → width via --aspect_ratio), optimizers
  2. the training horizon from --num_iterations | --target_flops | --target_param_data_ratio
  3. the loop: eval val bpb / CORE / samples / checkpoint on token cadences, then one optimizer step
     of grad_accum micro-batches; lr warmup → constant → linear warmdown; Muon momentum warmup
  4. a final checkpoint and a report section

Batch arithmetic. One optimizer step consumes exactly --total_batch_size tokens:
    total_batch_size = device_batch_size × max_seq_len × world_size × grad_accum_steps
and the data loader hands every step the same global rows whatever that split is, so runs with
different micro-batches or GPU counts are token-for-token comparable (and curves line up).

Cadences (--eval_every, --core_metric_every, --sample_every, --save_every) count optimizer steps when
bare, as upstream (--eval_every=250), and tokens with a unit (4M, 500K, 131072tok); -1 = off. Either way
they become token intervals (steps × --total_batch_size) before training (nanochat/cadence.py), so MC and
vanilla runs stay aligned. --log_every (ours) is a token count however written (0 = every step).
--resume=auto restores weights, optimizers, loader position and RNG (a finished run exits: "already complete");
a NaN/inf loss or gradient stops training with a debug checkpoint, or skips the step (--nonfinite=skip).

MegaContext (--mc_enabled=1 | --mc; flags in mc/config.py): micro-batches go through MCController
(mc/train/controller.py; loss = LM loss + mean loss of 1 + N packed working contexts per row); GistNet joins the
optimizers, grad averaging, clipping, checkpoints ("mc.*" keys, meta["mc_config"]; resume refuses a changed
MC config). --mc_auto_batch=1 shrinks the micro-batch, raising grad accum, so steps train on the vanilla
run's exact rows (mc/train/auto_batch.py). train/loss stays the plain LM loss; mc/* metrics (rank 0's) go to stdout
and W&B at the log cadence; MC_MEMORY_DEBUG=1 writes report/mc_memory_step<N>.txt at log steps.
--mc_enabled=0 runs the plain GPT forward, no MC code.
"""

import argparse
import dataclasses
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from mc.config import MCConfig, add_mc_flags, overridden_flags
from mc.ops.alerts import BandMonitor  # plain-Python band checks (no MC compute); the MFU band, on CUDA
from mc.ops.report_curves import log_curves_section
from mc.ops.telemetry import training_provider
from mc.train.auto_batch import mc_batch_plan
from nanochat import cli_checks as ck
from nanochat.adamw import average_gradients
from nanochat.cadence import parse_cadence, to_token_intervals
from nanochat.checkpoint_manager import (
    CheckpointError,
    load_checkpoint,
    load_gpt_weights,
    save_checkpoint,
    step_dir,
    tag_dir,
    verify_checkpoint,
)
from nanochat.common import (
    autocast_ctx,
    compute_cleanup,
    compute_init,
    die,
    get_base_dir,
    get_peak_flops,
    init_wandb,
    parse_token_count,
    print0,
    str2bool,
    synchronize,
)
from nanochat.core_eval import evaluate_core_bundle
from nanochat.dataloader import DistributedTokenLoader
from nanochat.dataset import SOURCES, resolve_source, sized_for
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (
    CurveLog,
    NonFiniteGuard,
    all_reduce_mean,
    complete,
    crossed,
    grad_accum_steps_of,
    loss_parts,
    lr_multiplier,
    muon_momentum,
    restore_rng,
    resume_problem,
    resume_step,
    rng_state,
)

# Flags whose change makes a checkpoint's continuation a different experiment: --resume refuses them.
RESUME_MUST_MATCH = ("depth", "aspect_ratio", "head_dim", "kv_head_ratio", "max_seq_len", "prev_token_mix", "query_gain",
                     "rope_fraction", "total_batch_size",
                     "source", "data_dir", "seed", "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay")


def build_parser():
    p = argparse.ArgumentParser(description="Pretrain the base model.", allow_abbrev=False)
    a = p.add_argument
    # runtime
    a("--run", default="dummy", help="W&B run name ('dummy' = no W&B; WANDB_MODE=offline works without network)")
    a("--device_type", default="", help="cuda|cpu|mps (empty = autodetect)")
    a("--seed", type=int, default=42)
    a("--compile", type=str2bool, default=None, help="torch.compile the model (default: on for CUDA)")
    # model
    a("--depth", type=ck.positive_int, default=20, help="number of transformer layers")
    a("--aspect_ratio", type=ck.positive_int, default=64, help="model width = depth × aspect_ratio")
    a("--head_dim", type=ck.positive_int, default=128, help="attention head size; width must be a multiple of it")
    a("--kv_head_ratio", type=ck.positive_int, default=1, help="query heads per key/value head (GQA); 1 = plain MHA")
    a("--max_seq_len", type=ck.positive_int, default=2048)
    a("--prev_token_mix", type=ck.nonneg_int, default=0,
      help="k previous tokens mixed into each input (nanochat/gpt.py); 0 = off")
    a("--query_gain", type=ck.nonneg_float, default=0.0,
      help="init of a learned per-head query gain after QK-norm; 0 = none")
    a("--rope_fraction", type=ck.finite_float, default=1.0,
      help="fraction of rotary pairs that rotate (the rest match content)")
    # training horizon: the first one that is set wins
    a("--num_iterations", type=ck.positive_int_or_off, default=-1,
      help="optimizer steps (-1 = derive from the next two)")
    a("--target_flops", type=ck.finite_float, default=-1.0, help="total training FLOPs (-1 = off)")
    a("--target_param_data_ratio", type=ck.finite_float, default=20.0, help="tokens per parameter (Chinchilla ≈ 20)")
    # optimization
    a("--device_batch_size", type=ck.positive_int, default=32, help="rows per micro-batch per process")
    a("--total_batch_size", type=ck.positive_int, default=524288,
      help="tokens per optimizer step, all processes together")
    a("--embedding_lr", type=ck.nonneg_float, default=0.2)
    a("--unembedding_lr", type=ck.nonneg_float, default=0.004)
    a("--matrix_lr", type=ck.nonneg_float, default=0.02)
    a("--weight_decay", type=ck.nonneg_float, default=0.0)
    a("--grad_clip", type=ck.nonneg_float, default=1.0, help="clip the global grad norm (0 = off)")
    a("--warmup_ratio", type=ck.nonneg_float, default=0.0)
    a("--warmdown_ratio", type=ck.nonneg_float, default=0.2)
    a("--final_lr_frac", type=ck.nonneg_float, default=0.0)
    # data
    a("--source", default="synthetic", choices=SOURCES, help="pretraining text")
    a("--data_dir", default="", help="a folder of your own .parquet/.jsonl/.txt files (implies --source=dir)")
    # cadences: a bare integer = optimizer steps (upstream), with a unit = tokens (4M, 500K, 131072tok)
    a("--eval_every", type=parse_cadence, default="128M", help="val bpb cadence (steps, or tokens: 4M; -1 = final only)")
    a("--eval_tokens", type=parse_token_count, default=10 * 524288, help="tokens per val bpb evaluation")
    a("--core_metric_every", type=parse_cadence, default="-1", help="CORE metric cadence (steps, or tokens: 4M; -1 = off)")
    a("--core_metric_max_per_task", type=ck.positive_int_or_off, default=500)
    a("--sample_every", type=parse_cadence, default="1B", help="sampling cadence (steps, or tokens: 4M; -1 = off)")
    a("--save_every", type=parse_cadence, default="-1", help="checkpoint cadence (steps, or tokens: 4M; -1 = only at the end)")
    a("--log_every", type=parse_token_count, default=0,
      help="console/W&B log cadence, in tokens even when bare (ours, not upstream's; 0 = every step)")
    # output
    a("--model_tag", type=ck.model_tag, default="", help="checkpoint folder name (default d<depth>)")
    a("--resume", default="", help="'' = fresh run, 'auto' = latest checkpoint if any, or a step number")
    a("--init_from", type=ck.model_tag, default="",
      help="fresh run from the GPT weights of base_checkpoints/TAG (e.g. to add MC)")
    a("--keep_last", type=ck.positive_int_or_off, default=-1, help="keep only the newest N checkpoints (-1 = keep all)")
    # numerical guard (nanochat/training.py NonFiniteGuard)
    a("--nonfinite", default="stop", choices=["stop", "skip"],
      help="a NaN/inf loss or gradient: stop (debug checkpoint, exit 2) or skip the step (no update, counted)")
    a("--debug_inject_nan_step", type=ck.nonneg_int_or_off, default=-1,
      help="testing knob: make step N's loss NaN (-1 = off)")
    # MegaContext
    a("--mc", action="store_true", help="shorthand for --mc_enabled=1")
    add_mc_flags(p)
    return p


def gpt_config(args, vocab_size: int) -> GPTConfig:
    """The GPT's shape from --depth, --aspect_ratio, --head_dim, --kv_head_ratio and the recall options."""
    n_embd = args.depth * args.aspect_ratio
    if n_embd % args.head_dim != 0:
        die(f"model width depth×aspect_ratio = {n_embd} is not a multiple of --head_dim={args.head_dim}")
    n_head = n_embd // args.head_dim
    if n_head % args.kv_head_ratio != 0:
        die(f"{n_head} attention heads are not divisible by --kv_head_ratio={args.kv_head_ratio}")
    try:
        return GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth, n_head=n_head,
                         n_kv_head=n_head // args.kv_head_ratio, n_embd=n_embd, prev_token_mix=args.prev_token_mix,
                         query_gain=args.query_gain, rope_fraction=args.rope_fraction)
    except ValueError as e:
        die(str(e))


def training_horizon(args, flops_per_token: float, num_params: int) -> int:
    """Optimizer steps: --num_iterations, else from --target_flops, else from --target_param_data_ratio."""
    if args.num_iterations > 0:
        steps = args.num_iterations
    elif args.target_flops > 0:
        steps = round(args.target_flops / (flops_per_token * args.total_batch_size))
    elif args.target_param_data_ratio > 0:
        steps = round(args.target_param_data_ratio * num_params / args.total_batch_size)
    else:
        die("no training horizon: set --num_iterations, --target_flops or --target_param_data_ratio")
    return max(1, steps)


def resume_or_init(args, checkpoint_dir, device, rank, world_size, model, mc_modules, mc_config, optimizers,
                   user_config, num_iterations):
    """(start_step, loader_state, resumed_meta) after restoring the newest checkpoint per --resume (weights of
    the GPT and the MC modules, optimizers, RNG), or after --init_from's GPT weights (fresh everything else);
    (0, None, None) for a fresh run; None when the final checkpoint already exists (the run is complete).
    A checkpoint whose settings differ from this run's is refused with what differs."""
    start_step, loader_state, resumed_meta = 0, None, None
    step_to_load = resume_step(args.resume, checkpoint_dir)
    if step_to_load is not None:
        try:
            resumed_meta = verify_checkpoint(checkpoint_dir, step_to_load)
        except CheckpointError as e:
            die(str(e))
        from mc.modules import resume_mismatch, split_mc_state  # lazily, as in main (no MC networks for vanilla)
        mc_problem = resume_mismatch(resumed_meta.get("mc_config"), mc_config)
        problem = resume_problem(resumed_meta, user_config, RESUME_MUST_MATCH, world_size, vars(model.config))
        if problem or mc_problem:
            die(f"cannot resume {checkpoint_dir} step {step_to_load}: " + (problem or f"{mc_problem}. Re-run with "
                f"the original MegaContext flags, or use a new --model_tag for a new run"))
        if complete("base_train", checkpoint_dir, step_to_load, num_iterations):
            return None
        try:
            model_state, optim_states, resumed_meta, rank_state = load_checkpoint(
                checkpoint_dir, step_to_load, device, load_optimizer=True, rank=rank)
        except (CheckpointError, FileNotFoundError) as e:
            die(str(e))
        if mc_modules is not None:
            model_state, mc_state = split_mc_state(model_state)
            mc_modules.load_state_dict(mc_state, strict=True)
        model.load_state_dict(model_state, strict=True)
        for opt, state in zip(optimizers, optim_states):
            opt.load_state_dict(state)
        start_step = resumed_meta["step"]
        loader_state = rank_state["loader"]
        restore_rng(rank_state, device)
        print0(f"resumed from {checkpoint_dir} step {start_step}")
        del model_state, optim_states
    elif args.init_from:  # fresh optimizers, data and step 0; only the GPT weights come from the checkpoint
        try:
            init_dir = tag_dir(os.path.dirname(checkpoint_dir), args.init_from, "--init_from")
            print0(load_gpt_weights(model, init_dir, device))
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            die(f"--init_from={args.init_from}: {e}")
    return start_step, loader_state, resumed_meta


def mc_settings(args, world_size: int):
    """(MCConfig, the auto-batch plan) of an MC run; None for a vanilla one, where any MC flag is an error
    (it would do nothing)."""
    stray = overridden_flags(args)
    if not args.mc_enabled:
        if stray:
            die(f"{' '.join(stray)}: MegaContext flags do nothing in a vanilla run; add --mc_enabled=1 (or --mc), "
                f"or drop them")
        return None
    try:
        cfg = MCConfig.from_flags(args)
        return cfg, mc_batch_plan(cfg, args.total_batch_size, args.device_batch_size, args.max_seq_len, world_size,
                                  args.num_iterations)
    except ValueError as e:
        die(str(e))


def startup_lines(args, config, num_params, flops_per_token, B, world_size, grad_accum_steps, num_iterations) -> str:
    """The model, and how one optimizer step splits into micro-batches."""
    total = num_iterations * args.total_batch_size
    return (f"model: depth={config.n_layer} width={config.n_embd} heads={config.n_head}/{config.n_kv_head} "
            f"vocab={config.vocab_size} params={num_params:,} flops/token={flops_per_token:.3e}\n"
            f"batch: total_batch_size={args.total_batch_size:,} tokens = {B} rows × {config.sequence_len} × "
            f"{world_size} proc × {grad_accum_steps} grad accum; {num_iterations:,} steps = {total:,} tokens "
            f"({total / num_params:.1f} tokens/param)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.data_dir:
        args.source = "dir"
    cadence_line = to_token_intervals(args, args.total_batch_size)  # before vars(args) becomes the run's config
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    device_type = device.type
    master = rank == 0
    base_dir = get_base_dir()

    # Batch arithmetic: validate before building anything expensive.
    T, B = args.max_seq_len, args.device_batch_size
    try:
        grad_accum_steps = grad_accum_steps_of(args.total_batch_size, B, T, world_size)
    except ValueError as e:
        die(str(e))
    val_tokens_per_fwdbwd = B * T * world_size  # eval keeps the vanilla micro-batch (same val rows, plain forward)

    # MegaContext config and micro-batch plan (before anything expensive: bad flags fail fast).
    mc_enabled = args.mc_enabled = args.mc_enabled or args.mc
    mc_config, mc_plan, mc_modules = mc_settings(args, world_size), None, None
    if mc_enabled:  # the MC networks are imported only here: a vanilla run never loads them (tests/test_mc_train.py)
        from mc.modules import MCModules, mc_state_dict
        from mc.train.controller import MCController
        from mc.train.train_step import MCTrainStep, describe, raise_recompile_limit
        mc_config, mc_plan = mc_config
        B, grad_accum_steps = mc_plan.device_batch_size, mc_plan.grad_accum_steps

    # ----------------------------------------------------------------------------------------------
    # Tokenizer, data, model.
    try:
        tokenizer = get_tokenizer()
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
    token_bytes = get_token_bytes(device=device)
    try:
        source = sized_for(resolve_source(args.source, args.data_dir or None), T)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))

    model_config = gpt_config(args, tokenizer.get_vocab_size())
    n_embd = model_config.n_embd
    with torch.device(device):
        model = GPT(model_config)
    model.init_weights()
    orig_model = model
    if mc_enabled:
        with torch.device(device):
            mc_modules = MCModules.from_config(mc_config, n_embd)
    train_params = list(orig_model.parameters()) + (list(mc_modules.parameters()) if mc_enabled else [])
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    if use_compile:
        if mc_enabled:
            raise_recompile_limit()  # the packed MC forward sees a few padded lengths as W anneals
        model = torch.compile(model, dynamic=False)
    num_params = orig_model.num_params()
    flops_per_token = orig_model.estimate_flops()

    num_iterations = training_horizon(args, flops_per_token, num_params)
    total_tokens = num_iterations * args.total_batch_size

    optimizers = orig_model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                             matrix_lr=args.matrix_lr, weight_decay=args.weight_decay,
                                             average_grads=False,  # averaged below, before clipping
                                             extra_matrix_params=mc_modules.matrix_params() if mc_enabled else (),
                                             extra_adam_params=mc_modules.adam_params() if mc_enabled else ())
    adamw, muon = optimizers

    # ----------------------------------------------------------------------------------------------
    # Resume: weights (GPT + MC modules), optimizers, loader position, RNG. A run whose final checkpoint
    # exists says "already complete" and exits 0, so a re-run recipe passes this stage in seconds.
    model_tag = args.model_tag or (f"d{args.depth}_mc" if mc_enabled else f"d{args.depth}")
    checkpoint_dir = tag_dir(os.path.join(base_dir, "base_checkpoints"), model_tag)
    user_config = vars(args).copy()
    resumed = resume_or_init(args, checkpoint_dir, device, rank, world_size, orig_model, mc_modules, mc_config,
                             optimizers, user_config, num_iterations)
    if resumed is None:  # the final checkpoint exists: "already complete"
        compute_cleanup()
        return
    start_step, loader_state, resumed_meta = resumed

    train_loader = DistributedTokenLoader(tokenizer, B, T, "train", source, rank=rank, world_size=world_size,
                                          device=device, state=loader_state)

    def build_val_loader():
        return DistributedTokenLoader(tokenizer, args.device_batch_size, T, "val", source, rank=rank,
                                      world_size=world_size, device=device)

    # ----------------------------------------------------------------------------------------------
    # Logging.
    wandb_run = init_wandb(args.run, "nanochat", user_config, master)
    peak_flops = get_peak_flops(device)
    mfu_alerts = BandMonitor(device_type, only=("train/mfu",), warmup_steps=min(100, num_iterations // 10))
    print0(startup_lines(args, model_config, num_params, flops_per_token, B, world_size, grad_accum_steps,
                         num_iterations))
    print0(cadence_line)
    if mc_enabled:
        mc_summary = describe(mc_config, mc_plan, T, sum(p.numel() for p in mc_modules.parameters()))
        print0(mc_summary)
    curve = CurveLog(os.path.join(base_dir, "report", "base_train_curve.jsonl"), master, start_step)

    def save(step, directory=checkpoint_dir, loader_state=None, extra_meta=None):
        meta = {"step": step, "model_config": vars(model_config), "user_config": user_config,
                "world_size": world_size, "device_batch_size": B, "max_seq_len": T,
                "val_bpb": last_val_bpb, "num_iterations": num_iterations, **(extra_meta or {})}
        model_state = orig_model.state_dict()
        if mc_enabled:
            meta["mc_config"] = dataclasses.asdict(mc_config)
            meta["mc_grad_accum_steps"] = grad_accum_steps
            meta["mc_train_state"] = mc_step.state_dict()  # LensNet's EMAs (same on every rank)
            model_state = {**model_state, **mc_state_dict(mc_modules)}
        rank_state = {"loader": loader_state or loader_state_in_hand, **rng_state(device)}
        save_checkpoint(directory, step, model_state, [o.state_dict() for o in optimizers], meta, rank=rank,
                        world_size=world_size, extra_rank_state=rank_state,
                        keep_last_n=args.keep_last if directory == checkpoint_dir else None)
        print0(f"saved checkpoint {step_dir(directory, step)}")
        return step_dir(directory, step)

    def save_debug(step, message):  # the state before `step` (1-based), under debug/: resume never loads it
        return save(step, os.path.join(checkpoint_dir, "debug"), step_loader_state, {"step": step - 1, "nonfinite": message})

    # ----------------------------------------------------------------------------------------------
    # The training forward of one micro-batch: (loss to backpropagate, detached LM loss for train/loss).
    telemetry = None
    if mc_enabled:  # controller errors and non-finite MC losses stop training via die() (no fallback)
        try:
            telemetry = training_provider(master)  # OTLP when MC_OTEL_ENDPOINT is set, else a no-op
        except (ValueError, RuntimeError) as e:
            die(str(e))
        mc_step = MCTrainStep(MCController(orig_model, mc_modules, mc_config, forward_model=model,
                                           total_steps=num_iterations, seed=args.seed),
                              rows_per_step=args.total_batch_size // T, B=B, rank=rank, world_size=world_size,
                              report_dir=os.path.join(base_dir, "report"), fail=die,
                              memory_debug=os.environ.get("MC_MEMORY_DEBUG", "0") not in ("", "0"),
                              telemetry=telemetry)
        if resumed_meta is not None:
            mc_step.load_state_dict(resumed_meta.get("mc_train_state"))
        train_forward = mc_step  # runs under the same autocast_ctx as the vanilla forward
    else:
        def train_forward(x, y, step, micro, log_step):
            with autocast_ctx(device_type):
                loss = model(x, y)
            return loss, loss.detach()

    # ----------------------------------------------------------------------------------------------
    # The loop. Step s evaluates the model as it is after s optimizer steps, then trains step s+1.
    last_val_bpb = resumed_meta.get("val_bpb") if resumed_meta else None
    min_val_bpb = float("inf")
    loss_sum = torch.zeros((), device=device)  # summed on device; read only at log time (no per-step sync)
    loss_count = 0
    guard = NonFiniteGuard(args.nonfinite, device, orig_model, mc_modules, args.debug_inject_nan_step)
    train_time = 0.0
    interval_tokens, interval_time, interval_steps = 0, 0.0, 0
    progress = tqdm(total=num_iterations, initial=start_step, desc="base_train", unit="step", disable=None if master else True,
                    file=sys.stderr, mininterval=2.0, dynamic_ncols=True)
    # The loader runs one micro-batch ahead (prefetch); a checkpoint stores the state from *before*
    # the batch in hand, so a resumed run fetches that same batch first.
    loader_state_in_hand = train_loader.state_dict()
    x, y = train_loader.next_batch()
    for step in range(start_step, num_iterations + 1):
        last_step = step == num_iterations
        tokens_now = step * args.total_batch_size
        tokens_prev = max(step - 1, 0) * args.total_batch_size if step > 0 else -1

        if last_step or crossed(tokens_prev, tokens_now, args.eval_every):
            model.eval()
            eval_steps = max(1, args.eval_tokens // val_tokens_per_fwdbwd)
            with autocast_ctx(device_type):
                last_val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
            min_val_bpb = min(min_val_bpb, last_val_bpb)
            print0(f"step {step:05d} | tokens {tokens_now:,} | val bpb {last_val_bpb:.4f}")
            wandb_run.log({"step": step, "train/tokens": tokens_now, "val/bpb": last_val_bpb})
            curve.log({"step": step, "tokens": tokens_now, "val_bpb": last_val_bpb})
            model.train()

        if args.core_metric_every > 0 and (last_step or crossed(tokens_prev, tokens_now, args.core_metric_every)) and step > 0:
            model.eval()
            with autocast_ctx(device_type):
                core = evaluate_core_bundle(orig_model, tokenizer, device, bundle="synthetic",
                                            max_per_task=args.core_metric_max_per_task)
            print0(f"step {step:05d} | CORE {core['core_metric']:.4f}")
            wandb_run.log({"step": step, "train/tokens": tokens_now, "core_metric": core["core_metric"]})
            model.train()

        if master and (last_step or crossed(tokens_prev, tokens_now, args.sample_every)) and step > 0:
            model.eval()
            for prompt in ("The passkey for the", "Once upon a time", "The capital of France is"):
                ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
                with autocast_ctx(device_type):
                    out = list(orig_model.generate(ids, max_tokens=24, temperature=0))
                tqdm.write(f"sample | {prompt!r} → {tokenizer.decode(out)!r}")
            model.train()

        if step > start_step and (last_step or crossed(tokens_prev, tokens_now, args.save_every)):
            save(step)

        if last_step:
            break

        # ---- one optimizer step ----------------------------------------------------------------
        tokens_after = (step + 1) * args.total_batch_size
        log_step = args.log_every <= 0 or crossed(tokens_now, tokens_after, args.log_every) or step + 1 == num_iterations
        synchronize(device_type)
        t0 = time.time()
        step_loader_state, step_loss = loader_state_in_hand, torch.zeros((), device=device)
        for micro in range(grad_accum_steps):
            loss, lm_loss = train_forward(x, y, step, micro, log_step)
            loss = guard.poison(loss, step + 1, micro)
            guard.watch(micro, loss, loss_parts(mc_step.last_result.metrics) if mc_enabled else None)
            step_loss += lm_loss
            loader_state_in_hand = train_loader.state_dict()
            x, y = train_loader.next_batch()  # prefetch while the GPU works
            if mc_enabled:  # --mc_async: the next micro-batch's variants are laid out during this backward
                mc_step.prefetch(x, y, *((step, micro + 1) if micro + 1 < grad_accum_steps else (step + 1, 0)))
            (loss / grad_accum_steps).backward()
        if ddp:
            # Average gradients across processes *before* clipping, so the clip sees the true global
            # gradient and every process applies the same update as a single big-batch process would.
            average_gradients(train_params)
        lrm = lr_multiplier(step / num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        # finite loss and gradient → clip; else stop (default) or skip. This step's one host sync.
        if guard.check(step + 1, train_params, args.grad_clip, save_debug):
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
            for group in muon.param_groups:
                group["momentum"] = muon_momentum(step)
            for opt in optimizers:
                opt.step()
            loss_sum += step_loss
            loss_count += grad_accum_steps
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        synchronize(device_type)
        dt = time.time() - t0
        if step - start_step > 1:  # the first steps include compilation/warmup
            train_time += dt
        interval_tokens += args.total_batch_size
        interval_time += dt
        progress.update(1)

        interval_steps += 1
        if log_step and loss_count:  # (none when every step since the last log was skipped as non-finite)
            mean_loss = loss_sum / max(loss_count, 1)
            if ddp:
                mean_loss = all_reduce_mean(mean_loss.clone())
            train_loss = mean_loss.item()
            if not math.isfinite(train_loss):
                die(f"non-finite training loss {train_loss} at step {step + 1}; lower the learning rates or check the data")
            tok_per_sec = interval_tokens / max(interval_time, 1e-9)
            metrics = {"step": step + 1, "train/loss": train_loss, "train/tokens": tokens_after,
                       "train/tok_per_sec": tok_per_sec, "train/lrm": lrm, "train/dt_ms": dt * 1000,
                       "train/tokens_per_step": args.total_batch_size, "train/grad_accum_steps": grad_accum_steps}
            mfu_text = ""
            if peak_flops:
                mfu = flops_per_token * tok_per_sec / (peak_flops * world_size)
                metrics["train/mfu"] = mfu
                mfu_text = f" | mfu {100 * mfu:.1f}%"
            line = (f"step {step + 1:05d}/{num_iterations} | loss {train_loss:.4f} | lrm {lrm:.2f} | "
                    f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f}{mfu_text}")
            line += "".join("\n" + a.line for a in mfu_alerts.check(step + 1, metrics))
            curve_row = {"step": step + 1, "tokens": tokens_after, "train_loss": train_loss}
            if mc_enabled:  # + the "mc |" line; the curve keeps the MC token loss and the recency baseline's
                mc_metrics, mc_line = mc_step.log(step + 1, interval_time * 1000 / max(interval_steps, 1), grad_accum_steps)
                metrics.update(mc_metrics)
                line += "\n" + mc_line
                curve_row.update(mc_token_loss=mc_metrics.get("mc/token_loss"), mc_loss_lod0=mc_metrics.get("train/loss_lod0"))
                curve_row.update({k: v for k, v in mc_metrics.items()  # for the report's LOD-mix and ΔNLL plots
                                  if k.startswith(("mc/lod_loss/", "mc/lod_frac/", "mc/adv_delta_", "mc/lens_loss",
                                                   "mc/preference_corr_mean", "mc/variants_per_sample",
                                                   "mc/prepared_ahead"))})
            if master:
                tqdm.write(line)
            wandb_run.log(metrics)
            curve.log(curve_row)
            loss_sum.zero_()
            loss_count, interval_tokens, interval_time, interval_steps = 0, 0, 0.0, 0
    progress.close()
    if mc_enabled:
        mc_step.close()

    # ----------------------------------------------------------------------------------------------
    timed_steps = max(num_iterations - start_step - 2, 1)
    summary = {
        "Parameters": num_params, "Depth": args.depth, "Width": n_embd, "Max seq len": T,
        "Total batch size": args.total_batch_size, "Grad accum steps": grad_accum_steps, "World size": world_size,
        "Iterations": num_iterations, "Training tokens": total_tokens, "Tokens : params": round(total_tokens / num_params, 2),
        "FLOPs per token": f"{flops_per_token:.3e}", "Data source": source.kind,
        "Final val bpb": last_val_bpb, "Minimum val bpb": min_val_bpb if min_val_bpb < float("inf") else None,
        "Mean step time (s)": round(train_time / timed_steps, 4) if train_time else None,
        "Training time (min)": round(train_time / 60, 2), "Skipped non-finite steps": guard.skipped,
        "Peak memory (MiB)": round(torch.cuda.max_memory_allocated() / 2**20) if device_type == "cuda" else None,
    }
    if mc_enabled:
        summary["MegaContext"] = mc_summary.splitlines()[0].removeprefix("megacontext: ")
    print0("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    get_report().log(section="Base model training", data=[user_config, summary])
    if mc_enabled:  # the MegaContext curves section (mc_curves.png) from this run's curve
        log_curves_section(get_report())
    wandb_run.finish()
    if telemetry is not None:
        telemetry.shutdown()  # flushes the batched spans
    compute_cleanup()


if __name__ == "__main__":
    main()
