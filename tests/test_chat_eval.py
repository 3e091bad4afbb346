"""
scripts/chat_eval.py and scripts/chat_rl.py on a tiny SFT checkpoint in a temporary NANOCHAT_BASE_DIR:

- chat_eval runs the offline default tasks with --max-problems 4, prints the table with ChatCORE and
  writes the report section "Chat evaluation sft"; hyphenated and underscore flags both parse
- categorical scoring compares only the letter tokens' logits at the answer position
- ChatCORE centres each task on its chance level (1 / number of choices for categorical, 0 generative)
- policy gradient: a positive-advantage reply becomes more likely, a negative one less likely
- chat_rl runs a couple of steps and saves a chatrl checkpoint and its curve
"""

import json
import os

import pytest
import torch

from nanochat.checkpoint_manager import load_checkpoint
from nanochat.gpt import GPT
from nanochat.tokenizer import RustBPETokenizer
from scripts import chat_eval
from tests.test_chat_train import TINY, make_tiny_base, tiny_config


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny base checkpoint and a 2-step SFT checkpoint trained from it."""
    base = make_tiny_base(str(tmp_path_factory.mktemp("chat_eval_base")))
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", base)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from scripts.chat_sft import main
        main([*TINY, "--source=base", "--num_iterations=2", "--eval_every=-1", "--recall_examples=8",
              "--spelling_examples=8"])
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return base


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base_dir)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield base_dir
    torch.set_num_threads(threads)


def test_chat_eval_offline_tasks_table_and_report(env, capsys):
    rows, chatcore = chat_eval.main(["-i", "sft", "--max-problems", "4", "--max-new-tokens", "8",
                                     "--recall-context-chars", "300", "--device-type", "cpu"])
    out = capsys.readouterr().out
    assert "| Task | type | problems |" in out and "**ChatCORE** (3 tasks)" in out
    assert [r["task"] for r in rows] == chat_eval.OFFLINE_TASKS
    assert all(r["total"] == 4 and r["too_long"] == 0 for r in rows)
    mc = next(r for r in rows if r["task"] == "SyntheticRecallMC")
    assert mc["type"] == "categorical" and mc["baseline"] == pytest.approx(0.25)
    assert chatcore == pytest.approx(sum(r["centered"] for r in rows) / 3)
    with open(os.path.join(env, "report", "chat-evaluation-sft.md")) as f:
        text = f.read()
    assert "- ChatCORE metric:" in text and "SpellingBee" in text


def test_flags_accept_hyphens_and_underscores():
    p = chat_eval.build_parser()
    a = p.parse_args(["-i", "mid", "-a", "ARC-Easy|GSM8K", "--max_problems=3", "--max_new_tokens", "5",
                      "--batch_size=2", "--device_type", "cpu"])
    b = p.parse_args(["-i", "mid", "-a", "ARC-Easy|GSM8K", "--max-problems=3", "--max-new-tokens", "5",
                      "--batch-size=2", "--device-type", "cpu"])
    assert vars(a) == vars(b) and a.max_problems == 3 and a.batch_size == 2
    with pytest.raises(ValueError, match="unknown task"):
        chat_eval.build_task("NoSuchTask")


class LetterModel(torch.nn.Module):
    """Logits that prefer a fixed letter among the letter tokens, and a non-letter token above all."""

    def __init__(self, tokenizer, letter, sequence_len=64):
        super().__init__()
        self.config = tiny_config(tokenizer.get_vocab_size())
        self.config.sequence_len = sequence_len
        self.favourite, self.distractor = tokenizer.encode(letter)[0], tokenizer.encode(" the")[0]

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        logits[..., self.distractor] = 10.0  # the argmax over the vocab; not a letter, so never chosen
        logits[..., self.favourite] = 5.0
        return logits


def test_categorical_scoring_and_chatcore_centering(base_dir):
    from tasks.common import CategoricalTask, mc_conversation

    class Quiz(CategoricalTask):
        answers = [0, 1, 0, 2, 0, 3, 1, 0]  # "A" is right 4 times out of 8

        def num_examples(self):
            return len(self.answers)

        def get_example(self, i):
            return mc_conversation(f"Question {i}?", ["w", "x", "y", "z"], self.answers[i])

    tok = RustBPETokenizer.from_directory(os.path.join(base_dir, "tokenizer"))
    args = chat_eval.build_parser().parse_args(["-i", "sft", "--batch-size", "3"])
    r = chat_eval.evaluate_task("Quiz", Quiz(), LetterModel(tok, "A"), tok, None, args, 0, 1, "cpu")
    assert (r["correct"], r["total"], r["too_long"]) == (4, 8, 0)
    assert r["baseline"] == pytest.approx(0.25) and r["centered"] == pytest.approx((0.5 - 0.25) / 0.75)
    short = chat_eval.evaluate_task("Quiz", Quiz(), LetterModel(tok, "A", sequence_len=5), tok, None, args, 0, 1, "cpu")
    assert short["too_long"] == 8 and short["correct"] == 0  # prompts longer than the context score 0


def test_policy_gradient_moves_probability_toward_the_better_reply(base_dir):
    from scripts.chat_rl import advantages, policy_gradient_backward

    torch.manual_seed(0)
    model = GPT(tiny_config(512))
    model.init_weights()
    prompt, good, bad = [1, 2, 3, 4], [10, 11, 12], [20, 21, 22]
    adv = advantages(torch.tensor([1.0, 0.0])).tolist()
    assert adv == [0.5, -0.5]
    rows = [(prompt + good, [0] * 4 + [1] * 3, adv[0]), (prompt + bad, [0] * 4 + [1] * 3, adv[1])]

    def logp(reply):
        x = torch.tensor([prompt + reply[:-1]])
        y = torch.tensor([[-1] * 3 + reply])
        return -model(x, y, loss_reduction="sum").item()

    before = logp(good), logp(bad)
    policy_gradient_backward(model, rows, num_sampled=6, world_size=1, batch_size=1, pad_id=0, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    assert logp(good) > before[0] and logp(bad) < before[1]


def test_chat_rl_runs_and_saves(env, monkeypatch):
    import scripts.chat_rl as chat_rl
    from tasks.synthetic_chat import SyntheticRecallChat

    class ParityReward(SyntheticRecallChat):
        """Reward = reply length parity: varies between samples, so advantages are nonzero and the
        policy-gradient update really runs (a tiny random model never gets the exact answer)."""

        def reward(self, conversation, assistant_response):
            return float(len(assistant_response) % 2)

    monkeypatch.setattr(chat_rl, "build_tasks", lambda args: (ParityReward("train", 4, 300), ParityReward("val", 2, 300)))
    chat_rl.main(["--device_type=cpu", "--num_iterations=2", "--examples_per_step=2", "--num_samples=4",
                  "--device_batch_size=2", "--max_new_tokens=6", "--eval_examples=2", "--eval_samples=2",
                  "--eval_every=1", "--save_every=1", "--temperature=1.0"])  # bare = steps, as upstream
    rl_dir, sft_dir = (os.path.join(env, d, "tiny") for d in ("chatrl_checkpoints", "chatsft_checkpoints"))
    after, _, meta, _ = load_checkpoint(rl_dir, None, "cpu")
    before, _, _, _ = load_checkpoint(sft_dir, None, "cpu")
    assert meta["step"] == 2 and len(meta["pass_at_k"]) == 2
    assert sorted(os.listdir(rl_dir)) == ["step_000001", "step_000002"] and meta["user_config"]["eval_every"] == "1"
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the policy moved
    with open(os.path.join(env, "report", "chat_rl_curve.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == [1, 2] and all(0 < r["reward"] < 1 for r in train)
    assert [r["step"] for r in rows if "pass_at_1" in r] == [0, 1, 2]
    assert all(r["train_loss"] == r["train_loss"] for r in train)  # finite, no NaN
    assert os.path.exists(os.path.join(env, "report", "chat-rl.md"))


def test_online_tasks_from_local_snapshots(env, tmp_path, capsys):
    """ARC (categorical) and GSM8K (generative, tool calls) through --data-dir, laid out like the hub."""
    arc_dir = tmp_path / "allenai" / "ai2_arc" / "ARC-Easy"
    gsm_dir = tmp_path / "openai" / "gsm8k" / "main"
    arc_dir.mkdir(parents=True)
    gsm_dir.mkdir(parents=True)
    with open(arc_dir / "test.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": str(i), "question": f"Which one {i}?", "answerKey": "B",
                                "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}}) + "\n")
    with open(gsm_dir / "test.jsonl", "w") as f:
        f.write(json.dumps({"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5.\n#### 5"}) + "\n")
    rows, _ = chat_eval.main(["-i", "sft", "-a", "ARC-Easy,GSM8K", "--data-dir", str(tmp_path),
                              "--max-new-tokens", "4", "--device-type", "cpu"])
    assert [(r["task"], r["type"], r["total"]) for r in rows] == [("ARC-Easy", "categorical", 3),
                                                                   ("GSM8K", "generative", 1)]
    assert "**ChatCORE** (2 tasks)" in capsys.readouterr().out
