"""
Never train on NaN: nanochat/training.py NonFiniteGuard and its use in base_train, mid_train/chat_sft and
chat_rl (--nonfinite=stop|skip, the testing knob --debug_inject_nan_step=N).

- the guard: watch() never syncs with the device; check() clips exactly like clip_grad_norm_; a non-finite
  step names the step, the micro-batch and the loss component (MC: base LM / variant / lens loss) or the
  parameters with non-finite gradients, saves a debug checkpoint, then stops (exit code 2) or skips
  (counted; debug checkpoint for the first skip only; too many in a row stop anyway)
- base_train (vanilla and MC), mid_train and chat_rl with a NaN injected at step 3: stop mode exits non-zero
  with the message and a debug checkpoint under <checkpoint_dir>/debug/ that --resume never loads; skip
  mode finishes with finite weights and reports 1 skipped step
"""

import math
import os

import pytest
import torch

import scripts.base_train as base_train
from nanochat.checkpoint_manager import latest_step, load_checkpoint
from nanochat.training import NonFiniteGuard, loss_parts

TINY = ["--device_type=cpu", "--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64",
        "--total_batch_size=512", "--device_batch_size=4", "--eval_every=-1", "--eval_tokens=512",
        "--sample_every=-1", "--log_every=0", "--warmup_ratio=0", "--num_iterations=5", "--save_every=2"]
MC = ["--mc_enabled=1", "--mc_block_size=8", "--mc_train_wc_length=24", "--allocator_recent_tokens=8",
      "--mc_num_random_variants=2", "--gistnet_layers=1"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def env(tiny_base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base_dir))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MC_MEMORY_DEBUG", "NANOCHAT_TEST_CHECKPOINT_PAUSE"):
        monkeypatch.delenv(k, raising=False)
    return str(tiny_base_dir)


def tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model(torch.randn(3, 4)).sum().backward()
    return model


# --------------------------------------------------------------------------------------------- the guard
def test_watch_never_syncs_and_check_clips_like_torch(monkeypatch):
    model, twin = tiny_model(), tiny_model()
    guard = NonFiniteGuard("stop", "cpu", model)

    def no_sync(*args):
        raise AssertionError("host sync inside watch()")
    with monkeypatch.context() as m:  # a per-micro-batch .item()/bool()/float() would raise here
        for name in ("item", "__bool__", "__float__", "tolist"):
            m.setattr(torch.Tensor, name, no_sync)
        for micro in range(3):
            loss = guard.poison(torch.tensor(2.0 + micro), 1, micro)
            guard.watch(micro, loss, loss_parts({"mc/lm_loss": torch.tensor(1.0), "mc/wc_length": 24}))
    assert guard.check(1, model.parameters(), 0.01)
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_stop_names_step_micro_batch_and_mc_component(capsys):
    model = tiny_model()
    guard = NonFiniteGuard("stop", "cpu", model)
    saved = []
    guard.watch(0, torch.tensor(3.0), loss_parts({"mc/lm_loss": torch.tensor(2.0), "mc/token_loss": torch.tensor(1.0)}))
    guard.watch(1, torch.tensor(math.nan), loss_parts({"mc/lm_loss": torch.tensor(2.0),
                                                       "mc/token_loss": torch.tensor(math.nan),
                                                       "mc/lens_loss": torch.tensor(0.5)}))
    with pytest.raises(SystemExit) as e:
        guard.check(7, model.parameters(), 1.0, lambda step, msg: saved.append((step, msg)) or "/x/debug/step_000007")
    err = capsys.readouterr().err
    assert e.value.code == 2 and saved and saved[0][0] == 7
    assert "non-finite loss at step 7, micro-batch 1" in err
    assert "MC variant loss (mc/token_loss) = nan" in err and "lens" not in err.split("micro-batch 1:")[1].split("\n")[0]
    assert "debug checkpoint" in err and "/x/debug/step_000007" in err and "--nonfinite=skip" in err


def test_nonfinite_gradient_names_the_parameters(capsys):
    model = tiny_model()
    model[1].weight.grad[0, 0] = float("inf")
    guard = NonFiniteGuard("stop", "cpu", model)
    guard.watch(0, torch.tensor(1.0))
    with pytest.raises(SystemExit):
        guard.check(4, model.parameters(), 1.0)
    err = capsys.readouterr().err
    assert "non-finite gradient at step 4" in err and "1.weight" in err and "0.weight" not in err


def test_skip_counts_saves_once_and_gives_up_after_a_streak(capsys):
    model = tiny_model()
    guard = NonFiniteGuard("skip", "cpu", model)
    saved = []
    for step in (1, 2):
        guard.watch(0, torch.tensor(math.nan))
        assert guard.check(step, model.parameters(), 1.0, lambda s, m: saved.append(s) or "dbg") is False
    model[0].bias.grad[1] = float("nan")  # finite loss, NaN gradient: skipped too
    guard.watch(0, torch.tensor(1.0))
    assert guard.check(3, model.parameters(), 1.0) is False
    assert guard.skipped == 3 and saved == [1]
    out = capsys.readouterr().out
    assert "skipping step 2 (--nonfinite=skip)" in out and "non-finite gradients in 1 tensors: 0.bias" in out
    model[0].bias.grad.zero_()  # what the trainer's zero_grad does after a skip
    guard.watch(0, torch.tensor(1.0))
    assert guard.check(4, model.parameters(), 1.0) and guard.consecutive == 0
    with pytest.raises(SystemExit):
        for step in range(5, 5 + NonFiniteGuard.MAX_CONSECUTIVE_SKIPS):
            guard.watch(0, torch.tensor(math.inf))
            guard.check(step, model.parameters(), 1.0)
    assert "in a row were non-finite" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- trainers
def read_report(base, slug):
    with open(os.path.join(base, "report", f"{slug}.md")) as f:
        return f.read()


def assert_stopped_with_debug_checkpoint(capsys, ckpt, step, *phrases):
    err = capsys.readouterr().err
    assert f"non-finite loss at step {step}, micro-batch 0" in err and "Traceback" not in err
    assert f"injected on purpose by --debug_inject_nan_step={step}" in err
    for phrase in phrases:
        assert phrase in err, phrase
    debug = os.path.join(ckpt, "debug")
    assert f"debug checkpoint (the state before step {step}" in err and debug in err
    state, _, meta, _ = load_checkpoint(debug, step, "cpu")
    assert meta["step"] == step - 1 and "non-finite loss" in meta["nonfinite"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert latest_step(ckpt) == step - 1  # resume never picks the debug checkpoint


def test_base_train_stop_and_skip(env, capsys):
    ckpt = os.path.join(env, "base_checkpoints", "nan_stop")
    with pytest.raises(SystemExit) as e:
        base_train.main([*TINY, "--model_tag=nan_stop", "--debug_inject_nan_step=3"])
    assert e.value.code == 2
    assert_stopped_with_debug_checkpoint(capsys, ckpt, 3, "non-finite gradients in", "transformer.wte.weight")

    base_train.main([*TINY, "--model_tag=nan_skip", "--debug_inject_nan_step=3", "--nonfinite=skip"])
    out = capsys.readouterr().out
    assert "skipping step 3 (--nonfinite=skip)" in out and "step 00003/5 | loss" not in out
    assert "step 00004/5 | loss" in out
    state, _, meta, _ = load_checkpoint(os.path.join(env, "base_checkpoints", "nan_skip"), None, "cpu")
    assert meta["step"] == 5 and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert "- Skipped non-finite steps: 1" in read_report(env, "base-model-training")


def test_mc_base_train_names_the_mc_parts(env, capsys):
    with pytest.raises(SystemExit):
        base_train.main([*TINY, *MC, "--model_tag=nan_mc", "--debug_inject_nan_step=3"])
    assert_stopped_with_debug_checkpoint(capsys, os.path.join(env, "base_checkpoints", "nan_mc"), 3,
                                         "the total loss while its parts are finite", "base LM loss (mc/lm_loss)",
                                         "MC variant loss (mc/token_loss)")


def test_mid_train_stop_and_skip(tmp_path, monkeypatch, capsys):
    from scripts.mid_train import main as mid_main
    from tests.test_chat_train import TINY as CHAT
    from tests.test_chat_train import make_tiny_base

    base = make_tiny_base(str(tmp_path))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    flags = [*CHAT, "--recall_examples=4", "--spelling_examples=4", "--identity_repeats=1", "--eval_every=-1",
             "--num_iterations=4", "--save_every=2"]
    with pytest.raises(SystemExit):
        mid_main([*flags, "--debug_inject_nan_step=3"])
    assert_stopped_with_debug_checkpoint(capsys, os.path.join(base, "mid_checkpoints", "tiny"), 3)
    mid_main([*flags, "--debug_inject_nan_step=3", "--nonfinite=skip", "--model_tag=skip"])
    state, _, meta, _ = load_checkpoint(os.path.join(base, "mid_checkpoints", "skip"), None, "cpu")
    assert meta["step"] == 4 and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert "- Skipped non-finite steps: 1" in read_report(base, "midtraining")


def test_chat_rl_stop(tmp_path, monkeypatch, capsys):
    import scripts.chat_rl as chat_rl
    from tasks.synthetic_chat import SyntheticRecallChat
    from tests.test_chat_train import make_tiny_base

    class LengthParity(SyntheticRecallChat):  # rewards that differ between samples: the backward really runs
        def reward(self, conversation, assistant_response):
            return float(len(assistant_response) % 2)

    base = make_tiny_base(str(tmp_path))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    monkeypatch.setattr(chat_rl, "build_tasks", lambda args: (LengthParity("train", 4, 300), LengthParity("val", 2, 300)))
    with pytest.raises(SystemExit):
        chat_rl.main(["--device_type=cpu", "--source=base", "--num_iterations=2", "--examples_per_step=2",
                      "--num_samples=4", "--device_batch_size=4", "--max_new_tokens=6", "--eval_every=-1",
                      "--eval_examples=1", "--eval_samples=1", "--debug_inject_nan_step=1"])
    err = capsys.readouterr().err
    assert "non-finite loss at step 1, micro-batch 0" in err
    assert os.path.isdir(os.path.join(base, "chatrl_checkpoints", "tiny", "debug", "step_000001"))
