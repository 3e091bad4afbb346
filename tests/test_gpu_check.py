"""dev/gpu_check.sh: the GPU check runs end to end as a CPU dry run (every stage, the JSON), and every
command line of the real (GPU) sizes parses with its script's own parser, so a typo there fails here and
not on the one rented GPU hour."""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dev"))
import gpu_check  # noqa: E402

REPO = gpu_check.REPO


def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "gc.json"
    r = subprocess.run(["bash", "dev/gpu_check.sh", "--dry_run", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["ok"] and data["dry_run"]
    assert list(data["stages"]) == ["tokenizer", "memory", "memory_mc", "base", "base_mc", "bench", "bench_async", "mid",
                                    "sft", "rl"]
    assert all(s["rc"] == 0 for s in data["stages"].values())
    assert data["stages"]["base"]["tokens_per_s"] > 0 and data["mc_vs_vanilla_tokens_per_s"] > 0
    assert "vanilla" in json.dumps(data["stages"]["bench"]["bench"])
    assert data["stages"]["bench_async"]["bench"]["mc_async"] is True
    assert data["stages"]["memory_mc"]["estimate_bytes"]["total"] > data["stages"]["memory"]["estimate_bytes"]["weights"]
    assert data["memory_estimate_vs_peak"] == {}  # a CPU run has no CUDA peak to set the estimate against


def test_gpu_sizes_parse_with_each_script():
    from scripts import base_train, chat_rl, mc_bench_train, memory_plan, mid_train, tok_train
    from tasks.mixtures import add_mid_mixture_flags, add_sft_mixture_flags

    parsers = {"scripts.tok_train": tok_train.parse_args, "scripts.base_train": base_train.build_parser().parse_args,
               "scripts.mc_bench_train": mc_bench_train.build_parser().parse_args,
               "scripts.mid_train": mid_train.build_parser("mid", add_mid_mixture_flags).parse_args,
               "scripts.chat_sft": mid_train.build_parser("sft", add_sft_mixture_flags).parse_args,
               "scripts.chat_rl": chat_rl.build_parser().parse_args,
               "scripts.memory_plan": memory_plan.build_parser().parse_args}
    for dry in (False, True):
        for name, argv in gpu_check.stages(gpu_check.sizes(dry), "/tmp/x"):
            module = argv[argv.index("-m") + 1]
            parsers[module](argv[argv.index("-m") + 2:])  # argparse exits (SystemExit) on a bad flag
