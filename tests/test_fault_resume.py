"""
SIGKILL fault tests: a trainer killed at a bad moment and re-run with --resume=auto ends exactly where an
uninterrupted run ends, and nothing else in $NANOCHAT_BASE_DIR is lost.

Each case trains a tiny model in a subprocess with a checkpoint every few steps, kills it with SIGKILL
(no chance to clean up), snapshots every file in the base dir, re-runs the same command with
--resume=auto and checks:
- the run resumed from the newest *complete* checkpoint (a half-written `step_N.tmp` is ignored, then
  removed by the next save);
- its per-step losses (report/<stage>_curve.jsonl, full precision) equal the uninterrupted run's;
- every file that existed after the kill still exists with the same bytes (tokenizer, earlier
  checkpoints, other report files), except the curve, whose rows up to the resumed step are kept.

Cases: base_train killed between checkpoints; base_train killed in the middle of a checkpoint write
(NANOCHAT_TEST_CHECKPOINT_PAUSE, nanochat/checkpoint_manager.py, holds the save after the rank files and
before meta.json + rename, so the kill lands there deterministically); the same for base_train with
--mc_enabled=1 (GistNet restored) and for chat_sft. A resumed run whose final checkpoint exists says
"already complete" and exits 0 without touching anything.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from nanochat.checkpoint_manager import latest_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--device_type=cpu", "--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64",
        "--total_batch_size=512", "--device_batch_size=4", "--eval_every=-1", "--eval_tokens=512",
        "--sample_every=-1", "--log_every=0", "--warmup_ratio=0", "--num_iterations=16",
        "--save_every=4", "--model_tag=fault"]  # steps (512 tokens each), 2 micro-batches: checkpoints at 4, 8, 12, 16
MC = ["--mc_enabled=1", "--mc_block_size=8", "--mc_train_wc_length=24", "--allocator_recent_tokens=8",
      "--mc_num_random_variants=2", "--gistnet_layers=1", "--mc_gist_delta_weight=0.1", "--num_iterations=8"]
SFT = ["--device_type=cpu", "--device_batch_size=2", "--total_batch_size=512", "--recall_context_chars=300",
       "--val_examples=8", "--eval_tokens=512", "--log_every=0", "--eval_every=-1", "--recall_examples=8",
       "--spelling_examples=8", "--source=base", "--num_iterations=6", "--save_every=2", "--model_tag=fault"]
STAGES = {"base_train": ("base_checkpoints", "base_train_curve.jsonl"),
          "chat_sft": ("chatsft_checkpoints", "chat_sft_curve.jsonl")}


def env_for(base, **extra):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MC_MEMORY_DEBUG", "NANOCHAT_TEST_CHECKPOINT_PAUSE"):
        if k not in extra:
            env.pop(k, None)
    return env


def run(script, base, flags):
    r = subprocess.run([sys.executable, "-m", f"scripts.{script}", *flags], cwd=REPO, env=env_for(base),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(base, script):
    with open(os.path.join(base, "report", STAGES[script][1])) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: (r["train_loss"], r.get("mc_token_loss")) for r in rows if "train_loss" in r}


def snapshot(base, skip=()):
    """{relative path: sha256} of every file under base, except under the relative folders in skip."""
    out = {}
    for root, dirs, files in os.walk(base):
        rel_root = os.path.relpath(root, base)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel_root, d)) not in skip]
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, base)] = hashlib.sha256(f.read()).hexdigest()
    return out


def wait_for(predicate, proc, timeout=120.0):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"the trainer exited ({proc.returncode}) before the kill point"
        assert time.time() - t0 < timeout, "timed out waiting for the kill point"
        time.sleep(0.005)


def kill_and_resume(script, base, flags, kill_when, pause_step=None):
    """Start the trainer, SIGKILL it when kill_when(ckpt_dir) holds, re-run with --resume=auto.
    Returns (resumed step, losses of the killed run, losses after the resume, stdout of the resume)."""
    ckpt = os.path.join(base, STAGES[script][0], "fault")
    extra = {"NANOCHAT_TEST_CHECKPOINT_PAUSE": str(pause_step)} if pause_step else {}
    with open(os.path.join(base, "killed.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", f"scripts.{script}", *flags], cwd=REPO,
                                env=env_for(base, **extra), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: kill_when(ckpt), proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before_kill = losses(base, script)
    resumable = latest_step(ckpt)
    assert resumable is not None
    tmp_dirs = sorted(n for n in os.listdir(ckpt) if n.endswith(".tmp"))
    snap = snapshot(base, skip={os.path.relpath(os.path.join(ckpt, n), base) for n in tmp_dirs})
    r = run(script, base, [*flags, "--resume=auto"])
    assert f"resumed from {ckpt} step {resumable}" in r.stdout, r.stdout[-2000:]
    # nothing lost: every file present after the kill is still there, byte for byte (the curve keeps its rows
    # up to the resumed step); the half-written checkpoint folder is gone
    after = snapshot(base)
    curve = os.path.join("report", STAGES[script][1])
    assert {p: h for p, h in snap.items() if p != curve and after.get(p) != h} == {}
    assert {s: v for s, v in before_kill.items() if s <= resumable} == \
           {s: v for s, v in losses(base, script).items() if s <= resumable}
    assert not [n for n in os.listdir(ckpt) if n.endswith((".tmp", ".old"))]
    return resumable, before_kill, losses(base, script), r.stdout


def assert_same_trajectory(resumed, reference, first_step):
    assert sorted(resumed) == sorted(reference)
    for step in range(first_step, max(reference) + 1):
        for got, want in zip(resumed[step], reference[step]):
            if want is not None:
                assert abs(got - want) <= 1e-6, (step, got, want)


def fresh_base(tmp_path, tokenizer_base, name):
    base = tmp_path / name
    shutil.copytree(os.path.join(tokenizer_base, "tokenizer"), base / "tokenizer")
    (base / "report").mkdir()
    (base / "report" / "other-stage.md").write_text("## an earlier stage's report section\n")
    (base / "notes.txt").write_text("a user's file in the base dir\n")
    return base


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tmp_path_factory):
    """Uninterrupted runs: {"base": losses, "mc": losses}."""
    out = {}
    for key, flags in (("base", BASE), ("mc", [*BASE, *MC])):
        base = tmp_path_factory.mktemp(f"ref_{key}")
        shutil.copytree(os.path.join(tiny_base_dir, "tokenizer"), base / "tokenizer")
        run("base_train", base, flags)
        out[key] = losses(base, "base_train")
    return out


def complete_step(n):
    return lambda ckpt: os.path.isfile(os.path.join(ckpt, f"step_{n:06d}", "meta.json"))


def mid_write(n):  # every rank file is in step_N.tmp: the save is paused before meta.json and the rename
    return lambda ckpt: os.path.isfile(os.path.join(ckpt, f"step_{n:06d}.tmp", "rank0.json"))


def test_base_train_killed_between_checkpoints(reference, tiny_base_dir, tmp_path):
    base = fresh_base(tmp_path, tiny_base_dir, "between")
    # the pause at step 12's save only guarantees the run cannot finish before the kill
    resumed_from, killed, resumed, _ = kill_and_resume("base_train", base, BASE, complete_step(4), pause_step=12)
    assert resumed_from in (4, 8) and max(killed) < 13
    assert_same_trajectory(resumed, reference["base"], 1)
    r = run("base_train", base, [*BASE, "--resume=auto"])  # finished: says so, changes nothing
    assert "already complete at step 16" in r.stdout
    assert losses(base, "base_train") == resumed


def test_base_train_killed_during_checkpoint_write(reference, tiny_base_dir, tmp_path):
    base = fresh_base(tmp_path, tiny_base_dir, "mid_write")
    resumed_from, killed, resumed, _ = kill_and_resume("base_train", base, BASE, mid_write(8), pause_step=8)
    assert resumed_from == 4 and max(killed) == 8  # step 8 trained, its checkpoint never completed
    assert_same_trajectory(resumed, reference["base"], 1)


def test_mc_base_train_killed_during_checkpoint_write(reference, tiny_base_dir, tmp_path):
    base = fresh_base(tmp_path, tiny_base_dir, "mc")
    resumed_from, _, resumed, _ = kill_and_resume("base_train", base, [*BASE, *MC], mid_write(8), pause_step=8)
    assert resumed_from == 4
    assert_same_trajectory(resumed, reference["mc"], 1)  # LM loss and MC token loss: GistNet came back exactly


def test_chat_sft_killed_during_checkpoint_write(tmp_path):
    from tests.test_chat_train import make_tiny_base

    src = make_tiny_base(str(tmp_path / "src"))
    ref, base = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(src, ref)
    shutil.copytree(src, base)
    run("chat_sft", ref, SFT)
    resumed_from, _, resumed, _ = kill_and_resume("chat_sft", str(base), SFT, mid_write(4), pause_step=4)
    assert resumed_from == 2
    assert_same_trajectory(resumed, losses(ref, "chat_sft"), 1)
