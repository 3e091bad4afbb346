"""
Midtraining and chat SFT (scripts/mid_train.py, scripts/chat_sft.py, nanochat/chat_data.py,
nanochat/chat_train.py) on a tiny base checkpoint in a temporary NANOCHAT_BASE_DIR:

- targets are -1 exactly where the tokenizer mask is 0 (user turns, tool outputs, BOS, padding), so
  the per-token loss mask equals the tokenizer mask
- an all-masked micro-batch gives a loss of exactly 0 with finite (zero) gradients, never NaN, and adds
  nothing to a step
- the chat loader: same global rows whatever the B × world split; resuming from its state continues exactly
- mid → SFT end to end: loss falls on a repeated small set, checkpoints and report sections appear
- SFT resumed from a mid-run checkpoint reproduces the uninterrupted run's losses
- an MC checkpoint keeps its MC modules through midtraining (trained through the controller, saved back)
- bad flags stop with one clear error
"""

import json
import os
import shutil

import pytest
import torch

from nanochat.chat_data import ChatLoader, collate, render, shift_targets
from nanochat.chat_train import micro_batch_loss
from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer
from tests.conftest import train_tiny_tokenizer

T = 256
TINY = ["--device_type=cpu", "--device_batch_size=2", "--total_batch_size=512", "--recall_context_chars=300",
        "--val_examples=8", "--eval_tokens=512", "--log_every=0"]


def tiny_config(vocab_size):
    return GPTConfig(sequence_len=T, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def make_tiny_base(base, tag="tiny", mc_config=None):
    """A 512-token tokenizer in base/tokenizer (if missing) and a freshly initialised tiny GPT saved as
    base/base_checkpoints/<tag>/step_000000 (with MC modules when mc_config is given)."""
    tok_dir = os.path.join(base, "tokenizer")
    if not os.path.isdir(tok_dir):
        train_tiny_tokenizer().save(tok_dir)
    torch.manual_seed(0)
    config = tiny_config(512)
    model = GPT(config)
    model.init_weights()
    state, meta = model.state_dict(), {"step": 0, "model_config": vars(config)}
    if mc_config is not None:
        import dataclasses

        from mc.modules import MCModules, mc_state_dict
        mc = MCModules.from_config(mc_config, config.n_embd)
        mc.init_weights()
        state = {**state, **mc_state_dict(mc)}
        meta["mc_config"] = dataclasses.asdict(mc_config)
    save_checkpoint(os.path.join(base, "base_checkpoints", tag), 0, state, None, meta)
    return base


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_base(str(tmp_path_factory.mktemp("chat_base")))


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base_dir)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and immune to a busy machine's oversubscription
    yield base_dir
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    return RustBPETokenizer.from_directory(os.path.join(base_dir, "tokenizer"))


def curve(base, name):
    with open(os.path.join(base, "report", f"{name}_curve.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def spelling_conversation():
    from tasks.spellingbee import SpellingBee
    return SpellingBee("train", 10, seed=0)[0]  # user turn + assistant text, python call, python_output


# --------------------------------------------------------------------------------------------- masks
def test_targets_follow_the_tokenizer_mask(tokenizer):
    conv = spelling_conversation()
    ids, mask = tokenizer.render_conversation(conv)
    x, y = collate([(ids, mask)], pad_id=tokenizer.get_bos_token_id(), length=len(ids) + 5)
    assert x[0, :len(ids) - 1].tolist() == ids[:-1]
    assert ((y[0, :len(ids) - 1] != -1).long().tolist()) == mask[1:]  # loss mask == tokenizer mask
    assert (y[0, len(ids) - 1:] == -1).all()  # padding
    # the user turn and the tool output (between <|output_start|> and <|output_end|>) carry no loss
    out_s, out_e = ids.index(tokenizer.encode_special("<|output_start|>")), ids.index(tokenizer.encode_special("<|output_end|>"))
    user_e = ids.index(tokenizer.encode_special("<|user_end|>"))
    assert (y[0, :user_e + 1] == -1).all()
    assert (y[0, out_s - 1:out_e] == -1).all()  # y[t] is the target ids[t+1]
    assert (y[0] != -1).sum() > 5  # the assistant's own tokens do
    # the model's per-token loss is nonzero exactly where the tokenizer mask is 1
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.get_vocab_size()))
    model.init_weights()
    per_token = model(x, y, loss_reduction="none")[0, :len(ids) - 1]
    assert ((per_token != 0).long().tolist()) == mask[1:]


def test_shift_targets_and_truncation(tokenizer):
    assert shift_targets([1, 2, 3, 4], [0, 0, 1, 1]) == [-1, 3, 4]
    ids, mask = render(tokenizer, spelling_conversation(), 12)
    assert len(ids) == 12 and len(mask) == 12


def test_all_masked_micro_batch_is_zero_not_nan(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.get_vocab_size()))
    model.init_weights()
    ids, mask = tokenizer.render_conversation(spelling_conversation())
    masked = (ids, [0] * len(ids))
    x0, y0 = collate([masked, masked], tokenizer.get_bos_token_id())
    assert (y0 == -1).all()
    assert model(x0, y0).item() == 0.0  # 'mean' over zero targets: 0, not 0/0
    share, token_sum = micro_batch_loss(model, x0, y0, num_targets=0)
    assert share.item() == 0.0 and token_sum.item() == 0.0
    share.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and (g == 0).all() for g in grads)
    # in a step with one real micro-batch, the all-masked one changes nothing
    x1, y1 = collate([(ids, mask)], tokenizer.get_bos_token_id())
    n = int((y1 != -1).sum())
    model.zero_grad()
    micro_batch_loss(model, x1, y1, n)[0].backward()
    alone = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for x, y in ((x0, y0), (x1, y1)):
        micro_batch_loss(model, x, y, n)[0].backward()
    for a, p in zip(alone, model.parameters()):
        assert torch.allclose(a, p.grad)


# --------------------------------------------------------------------------------------------- loader
@pytest.mark.parametrize("pack", [True, False])
def test_loader_split_invariance_and_resume(tokenizer, pack):
    from tasks.common import TaskMixture
    from tasks.identity import Identity
    from tasks.spellingbee import SpellingBee

    data = TaskMixture([SpellingBee("train", 30, seed=0), Identity()], seed=1)
    one = ChatLoader(data, tokenizer, B=4, T=200, pack=pack)
    two = [ChatLoader(data, tokenizer, B=2, T=200, rank=r, world_size=2, pack=pack) for r in range(2)]
    for _ in range(3):
        x, y = one.next_batch()
        parts = [ld.next_batch() for ld in two]
        L = max(p[0].size(1) for p in parts)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, L - t.size(1)), value=v)
        x2 = torch.cat([pad(p[0], tokenizer.get_bos_token_id()) for p in parts])
        y2 = torch.cat([pad(p[1], -1) for p in parts])
        assert torch.equal(pad(x, tokenizer.get_bos_token_id()), x2) and torch.equal(pad(y, -1), y2)
        if pack:
            assert x.shape == (4, 200)
    state = one.state_dict()
    expected = one.next_batch()
    resumed = ChatLoader(data, tokenizer, B=4, T=200, pack=pack, state=json.loads(json.dumps(state)))
    got = resumed.next_batch()
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    with pytest.raises(ValueError, match="other settings"):
        ChatLoader(data, tokenizer, B=4, T=100, pack=pack, state=state)


# --------------------------------------------------------------------------------------------- scripts
def run_mid(*flags):
    from scripts.mid_train import main
    main([*TINY, "--recall_examples=4", "--spelling_examples=4", "--identity_repeats=1", *flags])


def run_sft(*flags):
    from scripts.chat_sft import main
    main([*TINY, "--recall_examples=8", "--spelling_examples=8", *flags])


def test_mid_then_sft_loss_falls_and_saves(env):
    run_mid("--num_iterations=24", "--eval_every=-1", "--embedding_lr=0.05")
    losses = curve(env, "mid_train")
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < first - 1.0, (first, last)
    _, _, meta, _ = load_checkpoint(os.path.join(env, "mid_checkpoints", "tiny"), None, "cpu")
    assert meta["step"] == 24 and meta["stage"] == "mid" and meta["val_bpb"] > 0
    with open(os.path.join(env, "report", "midtraining.md")) as f:
        assert "Final val bpb" in f.read()

    run_sft("--num_iterations=3", "--eval_every=-1")  # --source mid (default): starts from the mid checkpoint
    _, _, meta, _ = load_checkpoint(os.path.join(env, "chatsft_checkpoints", "tiny"), None, "cpu")
    assert meta["step"] == 3 and meta["source"] == "mid" and meta["user_config"]["pack"] is None
    assert all(v == v for v in curve(env, "chat_sft").values())  # no NaN
    assert os.path.exists(os.path.join(env, "report", "chat-sft.md"))


def test_sft_resume_continues_exactly(env, capsys):
    common = ["--source=base", "--num_iterations=6", "--model_tag=resume", "--eval_every=-1", "--save_every=3"]
    run_sft(*common)  # checkpoints at steps 3 and 6
    uninterrupted = curve(env, "chat_sft")
    ckpt = os.path.join(env, "chatsft_checkpoints", "resume")
    shutil.rmtree(os.path.join(ckpt, "step_000006"))
    run_sft(*common, "--resume=auto")
    resumed = curve(env, "chat_sft")
    assert sorted(resumed) == list(range(1, 7))
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step
    run_sft(*common, "--resume=auto")  # finished: says so and leaves everything as it is
    assert "chat_sft: already complete at step 6" in capsys.readouterr().out and curve(env, "chat_sft") == resumed


def test_mc_modules_carried_through_midtraining(env, tmp_path, monkeypatch, capsys):
    from mc.config import MCConfig
    from mc.modules import split_mc_state

    base = make_tiny_base(str(tmp_path), mc_config=MCConfig(block_size=16, max_lod=1, train_wc_length=128,
                                                            recent_tokens=32, num_random_variants=1,
                                                            gistnet_layers=1))
    shutil.copytree(os.path.join(env, "tokenizer"), os.path.join(base, "tokenizer"), dirs_exist_ok=True)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    run_mid("--num_iterations=2", "--eval_every=-1")
    before, _, _, _ = load_checkpoint(os.path.join(base, "base_checkpoints", "tiny"), 0, "cpu")
    after, _, meta, _ = load_checkpoint(os.path.join(base, "mid_checkpoints", "tiny"), None, "cpu")
    (_, mc_before), (_, mc_after) = split_mc_state(before), split_mc_state(after)
    assert meta["mc_config"]["block_size"] == 16 and set(mc_after) == set(mc_before) and mc_after
    assert any(not torch.equal(mc_before[k], mc_after[k]) for k in mc_after)  # trained through the controller
    with open(os.path.join(base, "report", "midtraining.md")) as f:
        assert "MCController" in f.read()
    # the same MC step as pretraining (MCTrainStep): its log line, and its state in the checkpoint
    assert "  mc | tok " in capsys.readouterr().out
    assert "adv_scale" in meta["mc_train_state"]["lens"]
    # RL does not train MC: weights and state pass through to its checkpoint unchanged (the convention)
    import scripts.chat_rl as chat_rl
    from tasks.synthetic_chat import SyntheticRecallChat

    monkeypatch.setattr(chat_rl, "build_tasks", lambda args: (SyntheticRecallChat("train", 2, 300),
                                                              SyntheticRecallChat("val", 2, 300)))
    chat_rl.main(["--device_type=cpu", "--source=mid", "--num_iterations=1", "--examples_per_step=2",
                  "--num_samples=2", "--device_batch_size=2", "--max_new_tokens=4", "--eval_examples=2",
                  "--eval_samples=1", "--eval_every=-1"])
    rl, _, rl_meta, _ = load_checkpoint(os.path.join(base, "chatrl_checkpoints", "tiny"), None, "cpu")
    assert rl_meta["mc_train_state"] == meta["mc_train_state"] and rl_meta["mc_config"] == meta["mc_config"]
    rl_mc = split_mc_state(rl)[1]
    assert set(rl_mc) == set(mc_after) and all(torch.equal(rl_mc[k], mc_after[k]) for k in mc_after)


@pytest.mark.parametrize("flags, message", [
    (["--resume=latest"], "--resume='latest'"),
    (["--total_batch_size=1000"], "is not a multiple of device_batch_size"),
    (["--max_seq_len=100000"], "longer than the checkpoint's context"),
    (["--source_tag=nope", "--source=base"], "no complete checkpoint"),
])
def test_bad_flags_give_one_clear_error(env, capsys, flags, message):
    with pytest.raises(SystemExit):
        run_mid("--num_iterations=1", *flags)
    assert message in capsys.readouterr().err


def test_ddp_two_processes_match_one(env):
    """torchrun with 2 gloo processes reproduces the 1-process losses (same rows, per-token mean over the
    whole step, gradients averaged before clipping)."""
    import subprocess
    import sys

    common = ["--num_iterations=3", "--eval_every=-1", "--recall_examples=4", "--spelling_examples=4",
              "--identity_repeats=1", "--source=base"]
    flags = [f for f in TINY if not f.startswith("--device_batch_size")]
    from scripts.mid_train import main
    main([*flags, *common, "--device_batch_size=2", "--model_tag=single"])
    single = curve(env, "mid_train")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "scripts.mid_train", *flags, *common,
           "--device_batch_size=1", "--model_tag=ddp"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(cmd, cwd=repo, env=dict(os.environ, NANOCHAT_BASE_DIR=env, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 proc × 1 grad accum" in r.stdout
    ddp = curve(env, "mid_train")
    for step in (1, 2, 3):
        assert ddp[step] == pytest.approx(single[step], rel=1e-4), step
