"""
scripts.base_train with --mc_enabled=1 on tiny CPU settings, with the real tokenizer, loader, GPT,
GistNet, optimizers and checkpoints:

- the LM loss and the MC token loss fall; MC_MEMORY_DEBUG writes its snapshots at log steps
- the checkpoint holds GistNet (model.pt "mc.*" keys, meta["mc_config"], the optimizer states) and
  mc.infer.checkpoint.build_model() gives it back as model.mc_modules / model.mc_config
- resuming continues exactly (same losses as the uninterrupted run); a changed MC config, or switching
  MC on/off, is refused with the flag named
- --mc_auto_batch=1 changes only the micro-batch split, not the training (same losses)
- a controller failure stops training with a message naming the phase (no silent vanilla fallback)
- --mc_enabled=0 never imports the controller (vanilla hot loop is MC-free)
- 2 processes (torchrun, gloo) reproduce the 1-process MC loss trajectory
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mc.train.controller as controller_module
import scripts.base_train as base_train
from mc.infer.checkpoint import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device_type=cpu", "--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64",
        "--total_batch_size=512", "--eval_every=-1", "--eval_tokens=512", "--sample_every=-1", "--log_every=0",
        "--warmup_ratio=0", "--grad_clip=1.0"]
MC = ["--mc_enabled=1", "--mc_block_size=8", "--mc_train_wc_length=24", "--allocator_recent_tokens=8",
      "--mc_num_random_variants=2", "--gistnet_layers=1", "--mc_gist_delta_weight=0.1"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def base_dir(tiny_base_dir):
    return tiny_base_dir


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MC_MEMORY_DEBUG"):
        monkeypatch.delenv(k, raising=False)
    return base_dir


def train(*flags):
    """base_train in this process (the MC step draws no RNG state, so in-process runs are exact)."""
    base_train.main([*TINY, *flags])


def curve(base_dir):
    with open(os.path.join(base_dir, "report", "base_train_curve.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "train_loss" in r}


def test_mc_loss_falls_and_gistnet_is_checkpointed(env, monkeypatch):
    monkeypatch.setenv("MC_MEMORY_DEBUG", "1")
    train(*MC, "--mc_auto_batch=0", "--device_batch_size=8", "--num_iterations=30", "--model_tag=falls",
          "--embedding_lr=0.05", "--log_every=2048")
    c = curve(env)
    assert sorted(c) == [4, 8, 12, 16, 20, 24, 28, 30]
    assert c[30]["train_loss"] < c[4]["train_loss"] - 0.5, c
    assert c[30]["mc_token_loss"] < c[4]["mc_token_loss"] - 0.5, c
    assert os.path.isfile(os.path.join(env, "report", "mc_memory_step4.txt"))
    assert not os.path.exists(os.path.join(env, "report", "mc_memory_step3.txt"))  # only at log steps

    ckpt = os.path.join(env, "base_checkpoints", "falls", "step_000030")
    state = torch.load(os.path.join(ckpt, "model.pt"))
    mc_keys = [k for k in state if k.startswith(("mc.gistnet.", "mc.lensnet."))]
    assert any(k.startswith("mc.gistnet.") for k in mc_keys) and any(k.startswith("mc.lensnet.") for k in mc_keys)
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    assert meta["mc_config"]["num_random_variants"] == 2 and meta["mc_config"]["block_size"] == 8
    assert meta["mc_train_state"]["lens"]["adv_scale"]["value"] > 0  # LensNet's EMA, restored on resume
    optim = torch.load(os.path.join(ckpt, "optim_rank0.pt"), weights_only=True)
    n_opt = sum(len(g["params"]) for o in optim for g in o["param_groups"])
    gpt_params = sum(1 for k in state if not k.startswith("mc."))
    assert n_opt == gpt_params + len(mc_keys)

    model, _, _ = build_model(os.path.join(env, "base_checkpoints", "falls"), 30, "cpu")
    assert model.mc_config.block_size == 8 and not model.mc_modules.training
    loaded = model.mc_modules.state_dict()
    for k in mc_keys:
        assert torch.equal(loaded[k[len("mc."):]], state[k])
    assert not any(k.startswith("mc") for k in model.state_dict())


def test_mc_resume_continues_exactly_and_refuses_changes(env, capsys):
    common = [*MC, "--device_batch_size=4", "--num_iterations=8", "--model_tag=resume", "--save_every=4"]
    train(*common)  # checkpoints at steps 4 and 8
    uninterrupted = curve(env)
    shutil.rmtree(os.path.join(env, "base_checkpoints", "resume", "step_000008"))
    capsys.readouterr()
    train(*common, "--resume=auto")
    assert "resumed from" in capsys.readouterr().out
    resumed = curve(env)
    for step in range(5, 9):
        for key in ("train_loss", "mc_token_loss", "mc_loss_lod0"):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-6, abs=1e-6), (step, key)

    vanilla = [f for f in common if f not in MC]  # the same run without any MC flag
    for flags, message in [([*common, "--mc_num_random_variants=3"], "--mc_num_random_variants=2 (now 3)"),
                           (vanilla, "trained with MegaContext")]:
        with pytest.raises(SystemExit):
            train(*flags, "--resume=auto")
        assert message in capsys.readouterr().err


def test_auto_batch_changes_only_the_split(env, capsys):
    common = [*MC, "--device_batch_size=4", "--num_iterations=3"]
    train(*common, "--mc_auto_batch=0", "--model_tag=ab0")
    plain = curve(env)
    train(*common, "--mc_auto_batch=1", "--model_tag=ab1")
    assert "× 8 grad accum" in capsys.readouterr().out
    split = curve(env)
    for step in (1, 2, 3):
        for key in ("train_loss", "mc_token_loss"):
            assert split[step][key] == pytest.approx(plain[step][key], rel=1e-5), (step, key)


@pytest.mark.parametrize("extra", [[], ["--mc_priority_variants=1", "--mc_num_random_variants=3",
                                         "--mc_dynamic_variants=1"]], ids=["random", "proposed+dynamic"])
def test_async_prepare_gives_the_same_losses(env, extra):
    """--mc_async builds micro-batch k+1's variants, layout, targets and rotary tables in a worker thread during
    k's backward; every loss is the same to the bit, and the worker really did the work."""
    common = [*MC, *extra, "--device_batch_size=2", "--num_iterations=3", "--mc_auto_batch=0"]  # 4 micro-batches
    train(*common, "--mc_async=0", "--model_tag=async0")
    plain = curve(env)
    train(*common, "--mc_async=1", "--model_tag=async1")
    ahead = curve(env)
    for step in (1, 2, 3):
        for key in ("train_loss", "mc_token_loss", "mc/lens_loss", "mc/adv_delta_mean", "mc/variants_per_sample"):
            assert ahead[step][key] == plain[step][key], (step, key)
        assert plain[step]["mc/prepared_ahead"] == 0
        assert ahead[step]["mc/prepared_ahead"] == (0.75 if step == 1 else 1.0)  # the run's first is built in line


def test_controller_error_stops_training(env, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(controller_module, "sample_variants", broken)
    with pytest.raises(SystemExit) as exc:
        train("--mc", *MC[1:], "--device_batch_size=4", "--num_iterations=2", "--model_tag=broken")  # --mc = --mc_enabled=1
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "phase 'sample' at step 0" in err and "sampler exploded" in err and "no fallback" in err
    assert not os.path.isdir(os.path.join(env, "base_checkpoints", "broken"))


def test_vanilla_run_never_imports_the_controller(env):
    code = ("import sys, scripts.base_train as b; b.main(sys.argv[1:]); "
            "print('MC-MODULES', sorted(m for m in sys.modules if m.startswith('mc.')))")
    r = subprocess.run([sys.executable, "-c", code, *TINY, "--device_batch_size=8", "--num_iterations=1",
                        "--model_tag=vanilla"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, NANOCHAT_BASE_DIR=str(env), OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("MC-MODULES")][0]
    assert "mc.train.controller" not in line and "mc.tree" not in line and "mc.gistnet" not in line, line


def test_mc_ddp_two_processes_match_one(env):
    common = [*MC, "--num_iterations=3", "--mc_auto_batch=0"]
    train(*common, "--device_batch_size=4", "--model_tag=mc_single")
    single = curve(env)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train", *TINY, *common,
           "--device_batch_size=2", "--model_tag=mc_ddp"]
    r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, NANOCHAT_BASE_DIR=str(env), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 proc × 2 grad accum" in r.stdout
    ddp = curve(env)
    for step in (1, 2, 3):
        assert ddp[step]["train_loss"] == pytest.approx(single[step]["train_loss"], rel=1e-4), step
