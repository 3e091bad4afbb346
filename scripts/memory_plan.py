"""
Will this training run fit on my GPU? A CPU dry run of base_train's memory (nanochat/memory.py).

    python -m scripts.memory_plan --gpu_memory=24 --vocab_size=65536 --depth=12 --max_seq_len=2048 \\
        --device_batch_size=8 --total_batch_size=524288                  # vanilla, one 24 GB card
    python -m scripts.memory_plan --gpu_memory=24 --vocab_size=65536 ... --mc_enabled=1 --mc_auto_batch=1

It takes base_train's flags (the same parser, so a command line is checked as base_train reads it)
plus --gpu_memory (GiB the card offers) and --vocab_size (the tokenizer's; run10.sh passes the one it
trains). It builds the GPT (and, for an MC run, GistNet/LensNet and the controller) on the meta device,
runs one micro-step's forward there with the GPU's bf16 numerics emulated, and prints the peak estimate
by part; for MC also the auto-batch plan (the micro-batch the MC step really runs). Exit 0 when the
estimate fits; 1 when it does not, naming the largest --device_batch_size that would. One GPU
(world size 1): that is what the single-card presets are for. run10.sh calls it before training on a
GPU preset (`bash run10.sh --gpu 4090 --dry_run` prints it and stops).
"""

import argparse
import dataclasses
import json

import torch

from mc.modules import MCModules
from mc.train.auto_batch import mc_batch_plan
from mc.train.controller import MCController
from mc.train.train_step import describe
from nanochat import cli_checks as ck
from nanochat.common import die
from nanochat.gpt import GPT
from nanochat.memory import GIB, estimate
from scripts.base_train import build_parser as base_train_parser
from scripts.base_train import gpt_config, mc_settings


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                parents=[base_train_parser()], conflict_handler="resolve")
    p.add_argument("--gpu_memory", type=ck.positive_float, required=True, help="GiB of memory on the card (24 for a 4090)")
    p.add_argument("--vocab_size", type=ck.positive_int, default=65536, help="the tokenizer's vocabulary size")
    p.add_argument("--out", default="", help="also write the estimate (bytes by part) and the verdict as JSON")
    return p


def micro_step_estimate(args, config, mc_config, rows: int):
    """The memory estimate of one micro-step of `rows` rows (the GPT alone, or the MC step)."""
    with torch.device("meta"):
        model = GPT(config)
        modules = MCModules.from_config(mc_config, config.n_embd) if mc_config else None
    extra = dict(extra_matrix_params=modules.matrix_params(), extra_adam_params=modules.adam_params()) if modules else {}
    optimizers = model.setup_optimizers(**extra)
    x = torch.zeros(rows, args.max_seq_len, dtype=torch.long, device="meta")
    if modules is None:
        def forward():
            return model(x, targets=x)
    else:
        controller = MCController(model, modules, mc_config, total_steps=max(args.num_iterations, 1), seed=args.seed)

        def forward():  # step 0: the W anneal starts at its longest working context
            return controller.process_batch(x, x, 0).loss
    params = list(model.parameters()) + (list(modules.parameters()) if modules else [])
    return estimate(params, optimizers, forward, autocast=args.device_type != "cpu")


def fitting_batch_sizes(args) -> list[int]:
    """The --device_batch_size values the batch arithmetic allows (total_batch_size divisible), largest first."""
    rows = args.total_batch_size // args.max_seq_len if args.total_batch_size % args.max_seq_len == 0 else 0
    return [b for b in range(args.device_batch_size, 0, -1) if rows and rows % b == 0]


def plan(args, config, mc_config):
    """(estimate, MC plan or None) at args.device_batch_size."""
    mc_plan = None
    rows = args.device_batch_size
    if mc_config is not None:
        mc_plan = mc_batch_plan(mc_config, args.total_batch_size, args.device_batch_size, args.max_seq_len, 1,
                                args.num_iterations)
        rows = mc_plan.device_batch_size
    return micro_step_estimate(args, config, mc_config, rows), mc_plan


def verdict(args, config, mc_config, est, budget) -> str:
    """'fits: ...', or 'does not fit: ...' naming the largest --device_batch_size that would."""
    if est.total <= budget:
        return f"fits: {est.total / GIB:.1f} of {args.gpu_memory:g} GiB ({100 * est.total / budget:.0f}%)"
    asked = args.device_batch_size
    for b in fitting_batch_sizes(args)[1:]:
        args.device_batch_size = b
        smaller, _ = plan(args, config, mc_config)
        if smaller.total <= budget:
            args.device_batch_size = asked
            return (f"does not fit: {est.total / GIB:.1f} GiB > {args.gpu_memory:g} GiB; --device_batch_size={b} "
                    f"would ({smaller.total / GIB:.1f} GiB; total_batch_size unchanged, more grad accumulation)")
    args.device_batch_size = asked
    return (f"does not fit: {est.total / GIB:.1f} GiB > {args.gpu_memory:g} GiB even at --device_batch_size=1; "
            f"lower --depth or --max_seq_len")


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.mc_enabled = args.mc_enabled or args.mc
    config = gpt_config(args, args.vocab_size)
    settings = mc_settings(args, world_size=1)
    mc_config = settings[0] if settings else None
    est, mc_plan = plan(args, config, mc_config)
    print(f"model: depth={config.n_layer} width={config.n_embd} vocab={config.vocab_size} T={args.max_seq_len} "
          f"device_batch_size={args.device_batch_size}{' (MegaContext)' if mc_config else ''}, "
          f"{'float32 (CPU)' if args.device_type == 'cpu' else 'bf16 autocast (GPU)'}")
    if mc_plan is not None:
        with torch.device("meta"):
            mc_params = sum(p.numel() for p in MCModules.from_config(mc_config, config.n_embd).parameters())
        print(describe(mc_config, mc_plan, args.max_seq_len, mc_params))
    print("estimated peak memory of a training micro-step (nanochat/memory.py; eager: torch.compile saves less):")
    print("\n".join(est.lines()))
    line = verdict(args, config, mc_config, est, args.gpu_memory * GIB)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"estimate_bytes": {**dataclasses.asdict(est), "total": est.total}, "gpu_memory_gib": args.gpu_memory,
                       "fits": line.startswith("fits"), "verdict": line,
                       "mc_plan": dataclasses.asdict(mc_plan) if mc_plan else None}, f, indent=2)
    return 0 if line.startswith("fits") else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ValueError as e:
        die(str(e))
