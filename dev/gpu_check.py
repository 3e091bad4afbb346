"""
The GPU check: one short run that exercises every stage the way a GPU run does (bf16 autocast,
torch.compile) and collects the figures a lab-notebook entry needs, as one JSON.

    bash dev/gpu_check.sh --out gpu_check.json          # on one H100/H200: ~8 minutes, no network
    bash dev/gpu_check.sh --dry_run --out /tmp/gc.json  # anywhere: tiny sizes on the CPU, ~1-2 minutes

Stages (each a subprocess with its own time limit; a failure is recorded, not fatal, so one broken stage
still leaves the figures of the others):
  tokenizer    tok_train on the built-in synthetic corpus (offline; vocab 2048)
  memory       scripts.memory_plan's estimate of the base and base_mc steps (CPU, meta device), to set
               beside their measured peaks: "memory_estimate_vs_peak" in the JSON (nanochat/memory.py)
  base         base_train, vanilla, d12 @ 2048, 40 steps x 256K tokens: tok/s, MFU, peak memory
  base_mc      the same with MegaContext (4 variants, W = 0.2 T): tok/s, MFU, peak memory
  bench        scripts.mc_bench_train at d12 @ 2048: vanilla vs MC tokens/s in one process, the controller's share
  bench_async  the same with --mc_async=1 (the next batch's variants laid out on a side CUDA stream)
  mid, sft, rl a few steps of each chat stage from the vanilla base checkpoint (bf16, the offline mixtures)
Figures are read from each stage's summary line / last log line / JSON (tok/s, "mfu X%", "Peak memory
(MiB)=N"). --dry_run shrinks every size (d2 @ 128 on the CPU, no compile) so the test suite can run the
whole script; its figures mean nothing, only that every stage and the JSON work.

Nothing is downloaded: the synthetic corpus, the offline chat mixtures and the recall RL task are built in.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sizes(dry_run: bool) -> dict:
    """Per-stage flags: the real check (one GPU) or the CPU dry run."""
    if dry_run:
        model = ["--device_type=cpu", "--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=128",
                 "--device_batch_size=2", "--total_batch_size=512", "--compile=0"]
        return {"tok": ["--vocab_size=512", "--max_chars=2000000"],
                "base": model + ["--num_iterations=3", "--eval_tokens=512", "--eval_every=-1", "--sample_every=-1",
                                 "--core_metric_every=-1", "--log_every=1"],
                "mc": ["--mc_num_random_variants=2", "--mc_train_wc_length=0.5", "--allocator_recent_tokens=32",
                       "--mc_auto_batch=0"],
                "chat": ["--device_type=cpu", "--device_batch_size=2", "--total_batch_size=512", "--num_iterations=2",
                         "--eval_every=-1", "--eval_tokens=512"],
                "rl": ["--device_type=cpu", "--train_examples=4", "--examples_per_step=2", "--num_samples=2",
                       "--max_new_tokens=8", "--eval_examples=2", "--eval_samples=1", "--recall_context_chars=300"],
                "bench": ["--device_type=cpu", "--depth=2", "--max_seq_len=128", "--device_batch_size=2", "--steps=1",
                          "--rounds=1", "--warmup=0", "--mc_num_random_variants=2", "--mc_train_wc_length=0.5",
                          "--allocator_recent_tokens=32"],
                "timeout": 300}
    model = ["--depth=12", "--max_seq_len=2048", "--device_batch_size=16", "--total_batch_size=262144"]
    return {"tok": ["--vocab_size=2048", "--max_chars=200000000"],
            "base": model + ["--num_iterations=40", "--eval_every=-1", "--eval_tokens=1M", "--sample_every=-1",
                             "--save_every=-1", "--core_metric_every=-1", "--log_every=1"],
            "mc": ["--mc_num_random_variants=4", "--mc_train_wc_length=0.2", "--allocator_recent_tokens=128",
                   "--mc_auto_batch=1"],
            "chat": ["--device_batch_size=16", "--num_iterations=10", "--eval_every=-1", "--eval_tokens=1M"],
            "rl": ["--train_examples=64", "--examples_per_step=16", "--num_samples=8", "--max_new_tokens=64",
                   "--eval_examples=32", "--eval_samples=2"],
            "bench": ["--depth=12", "--max_seq_len=2048", "--device_batch_size=8", "--steps=3", "--rounds=2",
                      "--mc_num_random_variants=4", "--mc_train_wc_length=0.2", "--allocator_recent_tokens=128"],
            "timeout": 240}


def stages(s: dict, out_dir: str) -> list:
    """(name, argv) in running order; later stages read the checkpoints earlier ones wrote."""
    py = [sys.executable, "-m"]
    vocab = next(a.split("=", 1)[1] for a in s["tok"] if a.startswith("--vocab_size="))
    return [
        ("tokenizer", py + ["scripts.tok_train", "--source=synthetic", *s["tok"]]),
        ("memory", py + ["scripts.memory_plan", *s["base"], "--gpu_memory=1000", f"--vocab_size={vocab}",
                         f"--out={os.path.join(out_dir, 'memory.json')}"]),
        ("memory_mc", py + ["scripts.memory_plan", *s["base"], "--mc_enabled=1", *s["mc"], "--gpu_memory=1000",
                            f"--vocab_size={vocab}", f"--out={os.path.join(out_dir, 'memory_mc.json')}"]),
        ("base", py + ["scripts.base_train", *s["base"], "--model_tag=gc"]),
        ("base_mc", py + ["scripts.base_train", *s["base"], "--model_tag=gc_mc", "--mc_enabled=1", *s["mc"]]),
        ("bench", py + ["scripts.mc_bench_train", *s["bench"], f"--out={os.path.join(out_dir, 'bench.json')}"]),
        ("bench_async", py + ["scripts.mc_bench_train", *s["bench"], "--mc_async=1",
                              f"--out={os.path.join(out_dir, 'bench_async.json')}"]),
        ("mid", py + ["scripts.mid_train", "--source_tag=gc", *s["chat"]]),
        ("sft", py + ["scripts.chat_sft", "--source_tag=gc", *s["chat"]]),
        ("rl", py + ["scripts.chat_rl", "--source_tag=gc", *s["rl"]]),
    ]


def figures(name: str, output: str, out_dir: str) -> dict:
    """What the stage's output says: tok/s and MFU of its last step line, peak memory of its summary."""
    got = {}
    steps = re.findall(r"tok/s ([\d,]+)(?:.*?mfu ([\d.]+)%)?", output)
    if steps:
        got["tokens_per_s"] = int(steps[-1][0].replace(",", ""))
        if steps[-1][1]:
            got["mfu"] = float(steps[-1][1]) / 100
    peak = re.search(r"Peak memory \(MiB\)=(\d+)", output)
    if peak:
        got["peak_memory_mib"] = int(peak.group(1))
    if name.startswith("bench") and os.path.isfile(os.path.join(out_dir, f"{name}.json")):
        with open(os.path.join(out_dir, f"{name}.json")) as f:
            got["bench"] = json.load(f)
    if name.startswith("memory") and os.path.isfile(os.path.join(out_dir, f"{name}.json")):
        with open(os.path.join(out_dir, f"{name}.json")) as f:
            got["estimate_bytes"] = json.load(f)["estimate_bytes"]
    return got


def memory_comparison(stages: dict) -> dict:
    """The estimate of each training stage beside its measured peak (torch.cuda.max_memory_allocated, which leaves
    out the CUDA context: so the estimate's allowance is left out of the ratio too)."""
    out = {}
    for est_name, run_name in (("memory", "base"), ("memory_mc", "base_mc")):
        est, peak = stages.get(est_name, {}).get("estimate_bytes"), stages.get(run_name, {}).get("peak_memory_mib")
        if est and peak:
            without_allowance = (est["total"] - est["allowance"]) / 2**20
            out[run_name] = {"estimate_mib": round(est["total"] / 2**20), "peak_mib": peak,
                             "peak_over_estimate_without_allowance": round(peak / without_allowance, 3)}
    return out


def run(dry_run: bool, out: str) -> dict:
    s = sizes(dry_run)
    base = tempfile.mkdtemp(prefix="gpu_check_")
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, WANDB_RUN="dummy", PYTHONPATH=REPO)
    result = {"dry_run": dry_run, "base_dir": base, "stages": {}}
    try:
        import torch

        result["torch"] = torch.__version__
        result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError as e:
        result["device"] = f"torch not importable: {e}"
    for name, argv in stages(s, base):
        t0 = time.time()
        try:
            p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=s["timeout"])
            rc, output = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:  # its partial output may come back as bytes despite text=True
            rc, output = "timeout", e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        row = {"rc": rc, "wall_s": round(time.time() - t0, 1), **figures(name, output, base)}
        if rc != 0:
            row["tail"] = output[-3000:]
        result["stages"][name] = row
        print(f"gpu_check: {name}: rc {rc}, {row['wall_s']} s, " +
              ", ".join(f"{k} {v}" for k, v in row.items() if k in ("tokens_per_s", "mfu", "peak_memory_mib")), flush=True)
    b, m = result["stages"].get("base", {}), result["stages"].get("base_mc", {})
    if b.get("tokens_per_s") and m.get("tokens_per_s"):
        result["mc_vs_vanilla_tokens_per_s"] = m["tokens_per_s"] / b["tokens_per_s"]
    result["memory_estimate_vs_peak"] = memory_comparison(result["stages"])
    result["ok"] = all(r["rc"] == 0 for r in result["stages"].values())
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"gpu_check: {'all stages passed' if result['ok'] else 'SOME STAGES FAILED'}; JSON: {out}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--dry_run", action="store_true", help="tiny sizes on the CPU (the test suite's check)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON of every figure")
    args = p.parse_args(argv)
    return 0 if run(args.dry_run, args.out)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
