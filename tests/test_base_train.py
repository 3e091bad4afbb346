"""
End-to-end behaviour of scripts.base_train on tiny CPU settings, with the real tokenizer, data
loader, model, optimizers and checkpoints:

- the loss falls on the synthetic corpus
- resuming from a mid-run checkpoint continues exactly (same losses as the uninterrupted run)
- 2 processes (torchrun, gloo) reproduce the loss trajectory of 1 process with the same total batch
- bad input (unknown/ill-typed flags, batch sizes that don't divide, corrupt checkpoint, resume with a
  different config, missing data dir) stops with one clear error
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--device_type=cpu", "--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64",
        "--total_batch_size=512", "--eval_every=-1", "--eval_tokens=512", "--sample_every=-1", "--log_every=0",
        "--warmup_ratio=0", "--grad_clip=1.0"]


@pytest.fixture(scope="module")
def base_dir(tiny_base_dir):
    return tiny_base_dir


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return base_dir


def run_train(base_dir, *flags):
    """Run base_train in a subprocess (fresh interpreter = fresh RNG/thread state, like a real re-run)."""
    cmd = [sys.executable, "-m", "scripts.base_train", *TINY, *flags]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def train_losses(base_dir):
    with open(os.path.join(base_dir, "report", "base_train_curve.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_loss_falls(env):
    r = run_train(env, "--device_batch_size=8", "--num_iterations=40", "--model_tag=falls", "--embedding_lr=0.05")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = train_losses(env)
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in (38, 39, 40)) / 3
    assert last < first - 1.0, (first, last)
    assert os.path.isdir(os.path.join(env, "base_checkpoints", "falls", "step_000040"))


def test_resume_continues_exactly(env):
    common = ["--device_batch_size=4", "--num_iterations=8", "--model_tag=resume"]
    r = run_train(env, *common, "--save_every=4")  # checkpoints at steps 4 and 8
    assert r.returncode == 0, r.stderr[-3000:]
    uninterrupted = train_losses(env)
    ckpt = os.path.join(env, "base_checkpoints", "resume")
    shutil.rmtree(os.path.join(ckpt, "step_000008"))  # as if the run had died after step 4's save
    r = run_train(env, *common, "--save_every=4", "--resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    resumed = train_losses(env)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-6), step


def test_upstream_cadences_count_steps(env):
    """An upstream command line: --eval_every=2 evaluates at steps 0, 2, 4 (and the final one), --save_every=3
    saves at step 3 (and the end); a unit makes it tokens: 1024tok = 2 steps of 512 tokens, the same steps."""
    def eval_steps():
        with open(os.path.join(env, "report", "base_train_curve.jsonl")) as f:
            return [r["step"] for r in map(json.loads, f) if "val_bpb" in r]

    flags = ["--device_batch_size=8", "--num_iterations=5"]
    r = run_train(env, *flags, "--model_tag=cad_steps", "--eval_every=2", "--save_every=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert eval_steps() == [0, 2, 4, 5]
    assert "eval_every 2 steps (1,024 tokens)" in r.stdout and "save_every 3 steps (1,536 tokens)" in r.stdout
    ckpt = os.path.join(env, "base_checkpoints", "cad_steps")
    assert sorted(os.listdir(ckpt)) == ["step_000003", "step_000005"]
    with open(os.path.join(ckpt, "step_000005", "meta.json")) as f:
        user_config = json.load(f)["user_config"]
    assert (user_config["eval_every"], user_config["save_every"]) == (1024, 1536)  # meta keeps token intervals
    r = run_train(env, *flags, "--model_tag=cad_tokens", "--eval_every=1024tok")
    assert r.returncode == 0, r.stderr[-3000:]
    assert eval_steps() == [0, 2, 4, 5]


def test_ddp_two_processes_match_one(env):
    common = ["--num_iterations=5", "--grad_clip=1.0"]
    r = run_train(env, *common, "--device_batch_size=4", "--model_tag=single")
    assert r.returncode == 0, r.stderr[-3000:]
    single = train_losses(env)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train", *TINY, *common,
           "--device_batch_size=4", "--model_tag=ddp"]
    r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, NANOCHAT_BASE_DIR=str(env), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 grad accum" in r.stdout and "2 proc" in r.stdout
    ddp = train_losses(env)
    for step in range(1, 6):
        assert ddp[step] == pytest.approx(single[step], rel=1e-4), step


@pytest.mark.parametrize("flags, message", [
    (["--no_such_flag=1"], "unrecognized arguments: --no_such_flag"),
    (["--depth=four"], "argument --depth: expected an integer, got 'four'"),
    (["--depth=0"], "argument --depth: must be an integer >= 1, got '0'"),
    (["--eval_every=lots"], "expected optimizer steps (250, as upstream nanochat), a token count with a unit"),
    (["--device_batch_size=8", "--device_batch_size=3"], "is not a multiple of device_batch_size"),
    (["--data_dir=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--head_dim=48"], "not a multiple of --head_dim"),
    (["--mc_num_random_variants=8"], "MegaContext flags do nothing in a vanilla run"),
    (["--resume=latest"], "--resume='latest': use '' (fresh), 'auto' (latest checkpoint) or a step number"),
])
def test_bad_flags_give_one_clear_error(env, flags, message):
    r = run_train(env, "--num_iterations=1", "--device_batch_size=8", *flags)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_resume_refuses_corrupt_checkpoint_and_changed_config(env):
    common = ["--device_batch_size=8", "--num_iterations=2", "--model_tag=guard"]
    r = run_train(env, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    step_dir = os.path.join(env, "base_checkpoints", "guard", "step_000002")

    r = run_train(env, *common, "--resume=auto", "--matrix_lr=0.05")
    assert r.returncode != 0 and "--matrix_lr=0.02" in r.stderr and "Traceback" not in r.stderr

    model_file = os.path.join(step_dir, "model.pt")
    with open(model_file, "r+b") as f:
        f.truncate(os.path.getsize(model_file) // 2)
    r = run_train(env, *common, "--resume=auto")
    assert r.returncode != 0 and "model.pt" in r.stderr and "Traceback" not in r.stderr


def test_init_from_starts_a_new_run_from_trained_weights(env):
    """--init_from: step 0 of the new run has the old run's weights (same val loss), MC modules fresh;
    a different model shape or a missing tag is one clear error."""
    r = run_train(env, "--device_batch_size=8", "--num_iterations=3", "--model_tag=donor", "--prev_token_mix=1",
                  "--query_gain=2", "--rope_fraction=0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(env, "--device_batch_size=8", "--num_iterations=1", "--model_tag=child", "--init_from=donor",
                  "--prev_token_mix=1", "--query_gain=2", "--rope_fraction=0.5", "--mc", "--mc_train_wc_length=32",
                  "--allocator_recent_tokens=16", "--mc_block_size=8", "--gistnet_layers=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "initialized the GPT from" in r.stdout and "donor" in r.stdout
    r = run_train(env, "--device_batch_size=8", "--num_iterations=1", "--model_tag=child2", "--init_from=donor")
    assert r.returncode != 0 and "prev_token_mix=1" in r.stderr and "Traceback" not in r.stderr
    r = run_train(env, "--device_batch_size=8", "--num_iterations=1", "--model_tag=child3", "--init_from=nobody")
    assert r.returncode != 0 and "--init_from=nobody" in r.stderr and "Traceback" not in r.stderr
