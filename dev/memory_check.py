"""
Does nanochat/memory.py's estimate match a real training step? Checked on the CPU, where it can be.

    python dev/memory_check.py                           # the lab-notebook table (a few GB of RAM, ~1 minute)
    python dev/memory_check.py --config 2,1024,4,16384 --mc --json /tmp/m.json

Each config (depth, T, B, vocab) runs in a fresh subprocess: the GPT (and for --mc the whole MC step,
GistNet and LensNet included) does one real float32 forward + backward on the CPU, and the growth of
the process's peak resident memory over that step is set against the estimate of the same step
(autocast=False: CPU numerics) of saved activations + backward working set + grads. A ratio near 1
means the accounting (what autograd saves, what the backward adds) is right; the GPU-only parts
(bf16 casts, the CUDA context) are checked by dev/gpu_check.py, which records estimate and peak.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["4,512,8,8192", "4,1024,8,8192", "6,512,16,4096", "2,2048,4,32768"]
MC_CONFIGS = ["4,1024,4,8192", "4,2048,2,8192"]


def build(config, mc: bool, device: str):
    """(GPT, MC modules or None, optimizers, one-step forward factory) at width 64 × depth."""
    import torch

    from mc.config import MCConfig
    from mc.modules import MCModules
    from mc.train.controller import MCController
    from nanochat.gpt import GPT, GPTConfig

    depth, T, B, V = config
    cfg = GPTConfig(sequence_len=T, vocab_size=V, n_layer=depth, n_head=depth, n_kv_head=depth, n_embd=64 * depth)
    mcc = MCConfig(num_random_variants=4, train_wc_length=0.25, recent_tokens=64) if mc else None
    with torch.device(device):
        model = GPT(cfg)
        modules = MCModules.from_config(mcc, cfg.n_embd) if mc else None
    if device != "meta":
        model.init_weights()
    extra = dict(extra_matrix_params=modules.matrix_params(), extra_adam_params=modules.adam_params()) if mc else {}
    optimizers = model.setup_optimizers(**extra)
    x = torch.randint(0, V, (B, T)) if device != "meta" else torch.zeros(B, T, dtype=torch.long, device="meta")
    if mc:
        controller = MCController(model, modules, mcc, total_steps=10)
        forward = lambda: controller.process_batch(x, x, 0).loss  # noqa: E731
    else:
        forward = lambda: model(x, targets=x)  # noqa: E731
    params = list(model.parameters()) + (list(modules.parameters()) if mc else [])
    return params, optimizers, forward


def measure_one(config, mc: bool) -> dict:
    """In this process: the estimate, then the real step's peak-RSS growth."""
    import torch

    from nanochat.memory import estimate

    torch.manual_seed(0)
    est = estimate(*build(config, mc, "meta"), autocast=False)
    params, _, forward = build(config, mc, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    forward().backward()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    predicted = est.activations + est.working_set + est.grads
    return {"config": ",".join(map(str, config)), "mc": mc, "measured_mib": round(grown / 2**20),
            "estimate_mib": round(predicted / 2**20), "activations_mib": round(est.activations / 2**20),
            "working_set_mib": round(est.working_set / 2**20), "ratio": round(grown / predicted, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", action="append", help="depth,T,B,vocab (repeatable; default: the notebook's set)")
    p.add_argument("--mc", action="store_true", help="the MC step instead of the plain GPT step")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: measure this config in this process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(tuple(int(v) for v in args.one.split(",")), args.mc)))
        return 0
    configs = [(c, args.mc) for c in args.config] if args.config else (
        [(c, False) for c in CONFIGS] + [(c, True) for c in MC_CONFIGS])
    rows = []
    for config, mc in configs:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", config, *(["--mc"] if mc else [])],
                             cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{'MC ' if mc else '   '}d,T,B,V={row['config']:<16} measured {row['measured_mib']:6d} MiB   "
              f"estimate {row['estimate_mib']:6d} MiB (activations {row['activations_mib']}, working set "
              f"{row['working_set_mib']})   measured/estimate {row['ratio']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
