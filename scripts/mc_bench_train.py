"""
Training throughput of vanilla vs MegaContext on the same model, in one process, same micro-batches.

    python -m scripts.mc_bench_train --device_type=cpu --depth=4 --max_seq_len=512 --device_batch_size=8
    python -m scripts.mc_bench_train ... --mc_num_random_variants=2 --mc_train_wc_length=0.25 --out=bench.json

MC defaults here: --mc_train_wc_length=0.25 --allocator_recent_tokens=64 (the training defaults, W = 0.2 T
and 128 recent tokens, do not fit T = 512); every other MC flag defaults as in training.

Two copies of one freshly initialised GPT (same seed), each with its own optimizers; the MC copy also
has GistNet. Every round runs --steps optimizer steps of the vanilla path, then --steps of the MC
path (forward, backward, clip, optimizer step), on the same random-token micro-batches, so both see
the same machine load (rounds interleave; the first --warmup steps of each path are discarded).
Tokens/s counts the B × T tokens of the micro-batch for both paths, the same tokens a vanilla step
trains on: the ratio is what MC costs per training token. On CPU both wall-clock and process CPU time
are reported: on a shared machine the wall clock includes waiting for cores other processes hold,
while CPU seconds (summed over this process's threads) measure the work itself.

Printed: tokens/s of each path and their ratio; per MC step the controller's phases (tree = wte +
GistNet, sample = variant plans + working contexts + positions, base_forward = the full-sequence LM
forward, variant = the packed forward, metrics), backward and optimizer time, and the controller's
share of the step. --mc_async=1: each MC step's backward overlaps the next batch's variants and layout
(mc/train/prepare.py), as in training. The W anneal is frozen at the target W (--mc_wc_anneal_steps is ignored), so the
numbers describe the end-of-run (hardest, shortest) working contexts unless --anneal_progress < 1.
"""

import argparse
import json
import statistics
import time

import torch

from mc.config import MCConfig, add_mc_flags
from mc.modules import MCModules
from mc.train.controller import MCController, MCControllerError
from mc.train.prepare import PrepareWorker
from mc.train.timing import PhaseTimer
from nanochat import cli_checks as ck
from nanochat.common import autocast_ctx, compute_init, die, print0, synchronize
from nanochat.gpt import GPT, GPTConfig


def build_parser():
    p = argparse.ArgumentParser(description="Vanilla vs MegaContext training throughput.", allow_abbrev=False)
    a = p.add_argument
    a("--device_type", default="", help="cuda|cpu|mps (empty = autodetect)")
    a("--seed", type=int, default=42)
    a("--depth", type=ck.positive_int, default=4)
    a("--aspect_ratio", type=ck.positive_int, default=64)
    a("--head_dim", type=ck.positive_int, default=64)
    a("--max_seq_len", type=ck.positive_int, default=512)
    a("--vocab_size", type=ck.positive_int, default=2048)
    a("--device_batch_size", type=ck.positive_int, default=8)
    a("--steps", type=ck.positive_int, default=5, help="optimizer steps per path per round")
    a("--rounds", type=ck.positive_int, default=3)
    a("--warmup", type=ck.nonneg_int, default=2, help="steps per path discarded at the start")
    a("--anneal_progress", type=ck.nonneg_float, default=1.0, help="where in the W anneal to measure (1 = target W)")
    a("--out", default="", help="write the numbers as JSON here")
    add_mc_flags(p)
    # The bench's own MC defaults (the measured CPU config of the MC training notes): a quarter of T as W and
    # 64 raw recent tokens, so the docstring's first command runs at T = 512 (the training defaults,
    # W = 0.2 T = 102 with R = 128 recent tokens, are refused there: R must stay below W).
    p.set_defaults(mc_train_wc_length=0.25, allocator_recent_tokens=64)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type, seed=args.seed)
    T, B = args.max_seq_len, args.device_batch_size
    n_embd = args.depth * args.aspect_ratio
    if n_embd % args.head_dim:
        die(f"width {n_embd} is not a multiple of --head_dim={args.head_dim}")
    try:
        mc_config = MCConfig.from_flags(args)
        mc_config.validate_against(T)
    except ValueError as e:
        die(str(e))
    cfg = GPTConfig(sequence_len=T, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_embd // args.head_dim,
                    n_kv_head=n_embd // args.head_dim, n_embd=n_embd)
    models = []
    for _ in range(2):
        torch.manual_seed(args.seed)
        with torch.device(device):
            m = GPT(cfg)
        m.init_weights()
        models.append(m)
    vanilla, mc_model = models
    with torch.device(device):
        mods = MCModules.from_config(mc_config, n_embd)
    opt_v = vanilla.setup_optimizers()
    opt_m = mc_model.setup_optimizers(extra_matrix_params=mods.matrix_params(), extra_adam_params=mods.adam_params())
    total = 1000
    controller = MCController(mc_model, mods, mc_config, total_steps=total, seed=args.seed)
    mc_step = round(min(max(args.anneal_progress, 0.0), 1.0) * total)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, args.vocab_size, (B, T + 1), generator=gen).to(device) for _ in range(args.steps)]
    batches = [(b[:, :-1], b[:, 1:]) for b in batches]
    worker = PrepareWorker(controller) if mc_config.async_prepare else None  # --mc_async: the next batch's layout
    params_m = list(mc_model.parameters()) + list(mods.parameters())

    def step_vanilla(x, y, i):
        with autocast_ctx(device.type):
            loss = vanilla(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vanilla.parameters(), 1.0)
        for o in opt_v:
            o.step()
            o.zero_grad(set_to_none=True)
        return {}

    def step_mc(x, y, i):
        timer = PhaseTimer(device)
        prepared = worker.take(i, x) if worker is not None else None
        with autocast_ctx(device.type):
            result = controller.process_batch(x, y, mc_step, prepared=prepared)
        if worker is not None:  # built during this step's backward, as the trainer does
            j = (i + 1) % len(batches)
            worker.submit(j, *batches[j], mc_step, None)
        with timer("backward"):
            result.loss.backward()
        with timer("optimizer"):
            torch.nn.utils.clip_grad_norm_(params_m, 1.0)
            for o in opt_m:
                o.step()
                o.zero_grad(set_to_none=True)
        synchronize(device.type)
        return {**result.timer.elapsed_ms(), **timer.elapsed_ms()}

    times = {"vanilla": [], "mc": []}
    cpu_times = {"vanilla": [], "mc": []}
    phases = []
    seen = {"vanilla": 0, "mc": 0}
    for r in range(args.rounds):
        for name, fn in (("vanilla", step_vanilla), ("mc", step_mc)):
            for i in range(args.steps):
                x, y = batches[i]
                synchronize(device.type)
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    ph = fn(x, y, i)
                except MCControllerError as e:
                    die(str(e))
                synchronize(device.type)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                seen[name] += 1
                if seen[name] > args.warmup:
                    times[name].append(dt)
                    cpu_times[name].append(dc)
                    if name == "mc":
                        phases.append(ph)
        print0(f"round {r + 1}/{args.rounds}: vanilla {B * T / statistics.median(times['vanilla']):,.0f} tok/s, "
               f"mc {B * T / statistics.median(times['mc']):,.0f} tok/s")

    tok_v = B * T / statistics.median(times["vanilla"])
    tok_m = B * T / statistics.median(times["mc"])
    step_ms = 1000 * statistics.median(times["mc"])
    ph = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    W = controller.wc_length(mc_step, T)
    out = {"device": str(device), "threads": torch.get_num_threads(), "depth": args.depth, "width": n_embd,
           "max_seq_len": T, "device_batch_size": B, "W": W, "num_variants": mc_config.num_random_variants,
           "gistnet": f"{mc_config.gistnet_type}/{mc_config.gistnet_layers}", "tok_per_sec_vanilla": tok_v,
           "tok_per_sec_mc": tok_m, "mc_over_vanilla": tok_m / tok_v, "mc_step_ms": step_ms,
           "vanilla_step_ms": 1000 * statistics.median(times["vanilla"]),
           "cpu_s_per_step_vanilla": statistics.median(cpu_times["vanilla"]),
           "cpu_s_per_step_mc": statistics.median(cpu_times["mc"]),
           "phases_ms": ph, "controller_share": ph["controller"] / step_ms,
           "overhead_share": ph["build"] / step_ms, "mc_async": mc_config.async_prepare}
    if worker is not None:
        worker.close()
    print0(f"\nconfig: depth={args.depth} width={n_embd} T={T} B={B} | MC: N={mc_config.num_random_variants} "
           f"W={W} block={mc_config.block_size} GistNet={out['gistnet']} | {device}, {out['threads']} threads")
    print0(f"vanilla: {tok_v:10,.0f} tok/s  ({out['vanilla_step_ms']:.0f} ms/step)")
    print0(f"mc:      {tok_m:10,.0f} tok/s  ({step_ms:.0f} ms/step)  = {100 * tok_m / tok_v:.0f}% of vanilla")
    cv, cm = out["cpu_s_per_step_vanilla"], out["cpu_s_per_step_mc"]
    print0(f"process CPU time per step: vanilla {cv:.2f} s, mc {cm:.2f} s -> mc = {100 * cv / cm:.0f}% of vanilla "
           f"tokens per CPU-second")
    order = ["tree", "sample", "base_forward", "variant", "metrics", "controller", "backward", "optimizer"]
    print0("mc step (median ms): " + " | ".join(f"{k} {ph[k]:.1f}" for k in order if k in ph))
    print0(f"controller share of the MC step: {100 * out['controller_share']:.0f}% (its forwards included); "
           f"tree+sampling overhead: {100 * out['overhead_share']:.0f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
