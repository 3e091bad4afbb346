"""
The memory dry run (nanochat/memory.py, scripts/memory_plan.py, run10.sh --dry_run):

- the estimate of a CPU step matches the real step's peak-memory growth (dev/memory_check.py, one small
  vanilla and one MC config, in fresh processes; the notebook's set gives 1.00-1.12)
- the GPU emulation saves what fused attention saves (activations grow linearly in T, not with T×T) and
  bf16 matmul inputs make the activations smaller than float32
- memory_plan: a run that fits exits 0; one that does not exits 1 naming a --device_batch_size that
  fits; an MC run prints its auto-batch plan; --out writes the JSON
- run10.sh's 24 GB (4090) and 32 GB (5090) presets fit with the full 65,536 vocabulary, vanilla and MC,
  and a preset overridden past the card's memory stops before any setup or training
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.memory import estimate, saved_activation_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--depth=2", "--aspect_ratio=64", "--head_dim=64", "--max_seq_len=512", "--device_batch_size=8",
         "--total_batch_size=32768", "--vocab_size=4096"]


def run(argv, timeout=300):
    r = subprocess.run(argv, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def meta_activations(T, B=2, autocast=True):
    cfg = GPTConfig(sequence_len=T, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    with torch.device("meta"):
        model = GPT(cfg)
    x = torch.zeros(B, T, dtype=torch.long, device="meta")
    return saved_activation_bytes(lambda: model(x, targets=x), exclude=model.parameters(), autocast=autocast)[0]


@pytest.mark.parametrize("mc", [False, True])
def test_the_estimate_matches_a_real_cpu_step(tmp_path, mc):
    config = "2,1024,2,8192" if mc else "2,1024,4,16384"
    rc, out = run([sys.executable, "dev/memory_check.py", "--config", config, *(["--mc"] if mc else []),
                   "--json", str(tmp_path / "m.json")])
    assert rc == 0, out
    (row,) = json.loads((tmp_path / "m.json").read_text())
    assert row["estimate_mib"] > 200  # big enough that allocator noise is small beside it
    assert 0.85 <= row["ratio"] <= 1.4, row


def test_gpu_numerics_save_no_attention_matrix_and_cast_to_bf16():
    # a T×T probability matrix per head would quadruple the attention part at 2T; fused kernels save O(T)
    assert meta_activations(2048) < 2.1 * meta_activations(1024)
    assert meta_activations(1024, autocast=True) < meta_activations(1024, autocast=False)
    a2, a4, a6 = (meta_activations(1024, B=b) for b in (2, 4, 6))  # per row the same (the weight casts once)
    assert a6 - a4 == pytest.approx(a4 - a2, rel=0.01)


def test_estimate_counts_weights_grads_and_both_optimizers():
    cfg = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    with torch.device("meta"):
        model = GPT(cfg)
    adamw, muon = model.setup_optimizers()
    x = torch.zeros(1, 64, dtype=torch.long, device="meta")
    est = estimate(model.parameters(), [adamw, muon], lambda: model(x, targets=x))
    n = sum(p.numel() for p in model.parameters())
    n_adam = sum(p.numel() for g in adamw.param_groups for p in g["params"])
    assert est.weights == est.grads == 4 * n
    assert est.optimizer == 4 * (2 * n_adam + (n - n_adam))
    assert est.total == est.weights + est.grads + est.optimizer + est.activations + est.working_set + est.allowance


def test_memory_plan_fits_or_names_a_batch_size_that_does(tmp_path):
    rc, out = run([sys.executable, "-m", "scripts.memory_plan", "--gpu_memory=24", *SMALL, "--out", str(tmp_path / "a.json")])
    assert rc == 0 and "fits:" in out, out
    assert json.loads((tmp_path / "a.json").read_text())["fits"] is True
    rc, out = run([sys.executable, "-m", "scripts.memory_plan", "--gpu_memory=1.2", *SMALL])
    assert rc == 1 and "does not fit" in out and "--device_batch_size=" in out, out
    suggested = int(out.split("--device_batch_size=")[1].split()[0])
    assert 1 <= suggested < 8
    rc, out = run([sys.executable, "-m", "scripts.memory_plan", "--gpu_memory=1.02", *SMALL[:4], "--device_batch_size=1",
                   "--total_batch_size=512", "--vocab_size=4096"])
    assert rc == 1 and "even at --device_batch_size=1" in out, out


def test_memory_plan_prints_the_mc_batch_plan(tmp_path):
    rc, out = run([sys.executable, "-m", "scripts.memory_plan", "--gpu_memory=24", *SMALL, "--mc_enabled=1",
                   "--mc_num_random_variants=2", "--allocator_recent_tokens=64", "--mc_auto_batch=1",
                   "--out", str(tmp_path / "mc.json")])
    assert rc == 0 and "auto-batch on" in out, out
    plan = json.loads((tmp_path / "mc.json").read_text())["mc_plan"]
    assert plan["device_batch_size"] * plan["divisor"] == 8 and plan["tokens_per_step"] == 32768


def test_memory_plan_bad_flags_are_one_clear_error():
    rc, out = run([sys.executable, "-m", "scripts.memory_plan", *SMALL])
    assert rc == 2 and "--gpu_memory" in out and "Traceback" not in out
    rc, out = run([sys.executable, "-m", "scripts.memory_plan", "--gpu_memory=0", *SMALL])
    assert rc == 2 and "Traceback" not in out


@pytest.mark.parametrize("gpu", ["4090", "5090"])
@pytest.mark.parametrize("profile", ["baseline", "mc"])
def test_run10_card_presets_fit_their_memory(gpu, profile):
    rc, out = run(["bash", "run10.sh", "--gpu", gpu, "--profile", profile, "--source", "fineweb", "--dry_run"])
    assert rc == 0, out
    assert "vocab=65536" in out and "fits:" in out, out
    assert ("auto-batch on" in out) == (profile == "mc")


def test_run10_stops_a_preset_pushed_past_its_card():
    rc, out = run(["bash", "run10.sh", "--gpu", "4090", "--source", "fineweb", "--dry_run", "--",
                   "--device_batch_size=16"])
    assert rc == 1 and "does not fit" in out and "--device_batch_size=4 would" in out, out
