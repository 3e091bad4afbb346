"""Tests for scripts/chat_cli.py against a tiny SFT checkpoint in a temporary NANOCHAT_BASE_DIR:
one-shot -p (as a real subprocess), interactive mode driven through stdin, a conversation that
outgrows the context, streaming of multi-byte characters, the --mc errors, and --mc end to end: a tiny
MegaContext checkpoint carries one session through a conversation several times longer than its context."""

import io
import itertools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from mc.config import MCConfig
from mc.modules import MCModules, mc_state_dict
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.synthetic import synthetic_texts
from nanochat.tokenizer import RustBPETokenizer
from scripts import chat_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 64


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """$NANOCHAT_BASE_DIR with tokenizer/ and chatsft_checkpoints/tiny/step_000005."""
    base = tmp_path_factory.mktemp("nanochat_base")
    tok = RustBPETokenizer.train_from_iterator(itertools.islice(synthetic_texts(), 20), 300, pad_vocab=True)
    tok.save(str(base / "tokenizer"))
    cfg = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=0.3)
        # make <|assistant_end|> unlikely so replies are not empty
        model.lm_head.weight[tok.encode_special("<|assistant_end|>")] = 0
        model.lm_head.weight[tok.get_bos_token_id()] = 0
    save_checkpoint(str(base / "chatsft_checkpoints" / "tiny"), 5, model.state_dict(), None,
                    {"model_config": asdict(cfg)})
    return str(base)


@pytest.fixture(scope="module")
def mc_base_dir(base_dir, tmp_path_factory):
    """A second $NANOCHAT_BASE_DIR (same tokenizer) holding an MC checkpoint: chatsft_checkpoints/tinymc."""
    base = tmp_path_factory.mktemp("nanochat_mc_base")
    shutil.copytree(os.path.join(base_dir, "tokenizer"), base / "tokenizer")
    tok = RustBPETokenizer.from_directory(str(base / "tokenizer"))
    cfg = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    mc_cfg = MCConfig(block_size=8, max_lod=2, recent_tokens=8, train_wc_length=40, infer_refocus_interval=16,
                      gistnet_layers=1, lensnet_layers=1)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    modules = MCModules.from_config(mc_cfg, cfg.n_embd)
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=0.3)
        model.lm_head.weight[tok.encode_special("<|assistant_end|>")] = 0
        model.lm_head.weight[tok.get_bos_token_id()] = 0
    save_checkpoint(str(base / "chatsft_checkpoints" / "tinymc"), 5, {**model.state_dict(), **mc_state_dict(modules)},
                    None, {"model_config": asdict(cfg), "mc_config": asdict(mc_cfg)})
    return str(base)


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base_dir)
    return base_dir


def run_main(argv, stdin_text=None, monkeypatch=None):
    if stdin_text is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    return chat_cli.main(argv)


def test_one_shot_prompt_subprocess(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "Hello there", "--max_tokens", "12",
                        "--device_type", "cpu", "-t", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "chatsft_checkpoints" in lines[0]  # load_model's "loading ..." line
    assert len(lines) >= 2 and lines[-1].strip()  # a non-empty reply
    assert "Traceback" not in r.stderr


def test_one_shot_is_deterministic_at_temperature_zero(env, capsys):
    argv = ["-p", "What is a tree?", "-m", "10", "-t", "0", "--device_type", "cpu", "-g", "tiny", "-s", "5"]
    assert run_main(argv) == 0
    first = capsys.readouterr().out
    assert run_main(argv) == 0
    assert capsys.readouterr().out == first


def test_interactive_through_stdin(env, capsys, monkeypatch):
    code = run_main(["-m", "6", "--device_type", "cpu"], "hi\n\nclear\nhow are you\nquit\nnever read\n", monkeypatch)
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 2 and "[new conversation]" in out
    assert "Type 'quit' to exit" in out
    # EOF (Ctrl-D) ends the session cleanly too
    assert run_main(["-m", "4", "--device_type", "cpu"], "hello\n", monkeypatch) == 0
    assert capsys.readouterr().out.count("Assistant: ") == 1


def test_conversation_longer_than_context(env, capsys, monkeypatch):
    turns = "".join("tell me more about the river and the old mill\n" for _ in range(6)) + "quit\n"
    code = run_main(["-m", "20", "-t", "0", "--device_type", "cpu"], turns, monkeypatch)
    assert code == 0  # a message, not a crash
    out = capsys.readouterr().out
    assert f"more than the model's context of {SEQ_LEN} tokens" in out
    assert "'clear'" in out and "--mc" in out
    # after 'clear' the chat works again
    turns = "one two three four five six seven eight nine ten " * 8 + "\nclear\nhi\nquit\n"
    assert run_main(["-m", "5", "--device_type", "cpu"], turns, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "more than the model's context" in out and out.count("Assistant: ") == 1  # no header for a refused turn
    # one-shot with a prompt that cannot fit: exit code 1 and the message on stderr
    assert run_main(["-p", "word " * 100, "--device_type", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "Shorten the prompt" in captured.err and "--mc" in captured.err and "Traceback" not in captured.err


def test_reply_cut_off_when_context_fills(env, capsys):
    # prompt ~15 tokens, context 64, max_tokens 500 -> the reply gets the remaining room and a note
    assert run_main(["-p", "hello", "-m", "500", "-t", "0", "--device_type", "cpu"]) == 0
    assert "reply cut off" in capsys.readouterr().out


def test_streaming_holds_back_partial_characters(env):
    """A character split over several byte tokens is printed once complete, never as U+FFFD."""
    tok = RustBPETokenizer.from_directory(os.path.join(env, "tokenizer"))
    word = "naïve 日本"
    ids = tok.encode(word)
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))  # some prefix splits a character

    class Replay:
        def generate(self, tokens, **kw):
            for t in ids:
                yield [t], [1]
            yield [tok.encode_special("<|assistant_end|>")], [1]

    args = chat_cli.parse_args(["-m", "50"])
    chat = chat_cli.Chat(Replay(), tok, 10_000, args, "cpu")
    out = io.StringIO()
    assert chat.reply("hi", out) == word
    assert out.getvalue() == word + "\n"
    assert chat.tokens[-1] == tok.encode_special("<|assistant_end|>")


def test_mc_flag_errors(env, mc_base_dir, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:  # a vanilla checkpoint
        run_main(["--mc", "-p", "hi", "--device_type", "cpu"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "no MC modules" in err and "--mc_enabled=1" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # the MC-only flags need --mc
        chat_cli.parse_args(["--mc_stats"])
    assert "add --mc" in capsys.readouterr().err
    monkeypatch.setenv("NANOCHAT_BASE_DIR", mc_base_dir)
    with pytest.raises(SystemExit):  # W must fit the context
        run_main(["--mc", "-p", "hi", "--device_type", "cpu", "--mc_infer_wc_length", "65"])
    assert "exceeds the model's sequence_len" in capsys.readouterr().err


def test_mc_conversation_longer_than_context(mc_base_dir, capsys, monkeypatch):
    """--mc: one session carries a conversation several times the model's context; nothing is refused."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", mc_base_dir)
    turns = "".join("tell me more about the river and the old mill\n" for _ in range(6)) + "quit\n"
    code = run_main(["--mc", "--mc_stats", "-m", "20", "-t", "0", "--device_type", "cpu"], turns, monkeypatch)
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 6 and "more than the model's context" not in out and "cut off" not in out
    history = [int(h) for h in re.findall(r"\[mc: history (\d+) tokens", out)]
    assert len(history) == 6 and history == sorted(history) and history[-1] > 4 * SEQ_LEN
    wc = [int(w) for w in re.findall(r"WC (\d+)/56 entries", out)]  # W = the training W 40 + interval 16
    assert len(wc) == 6 and max(wc) <= 56  # a hard cap, decoded tokens included
    kv = [int(k) for k in re.findall(r"KV <= (\d+) entries", out)]
    assert max(kv) <= SEQ_LEN
    # one-shot with a prompt longer than the context: answered, not refused
    assert run_main(["--mc", "-p", "word " * 100, "-m", "8", "--device_type", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out.strip()


def test_mc_conversation_saved_and_reopened(mc_base_dir, tmp_path, capsys, monkeypatch):
    """--session_dir: the conversation is saved after every message; --session ID reopens it with the same
    history (so the same next reply at temperature 0 as a chat that never stopped)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", mc_base_dir)
    store = str(tmp_path / "sessions")
    flags = ["--mc", "-m", "12", "-t", "0", "--device_type", "cpu", "--session_dir", store]
    assert run_main(flags, "the river\nthe old mill\nquit\n", monkeypatch) == 0
    out = capsys.readouterr().out
    sid = re.search(r"\[session (\w+), saved under", out).group(1)
    # reopened: one more turn; the same as three turns in one sitting
    assert run_main([*flags, "--session", sid], "and the bridge\nquit\n", monkeypatch) == 0
    reopened = capsys.readouterr().out.split("Assistant: ")[-1]
    assert run_main(flags, "the river\nthe old mill\nand the bridge\nquit\n", monkeypatch) == 0
    straight = capsys.readouterr().out.split("Assistant: ")[-1]
    assert reopened.strip() == straight.strip() and len(straight.strip()) > 3
    with pytest.raises(SystemExit):
        run_main([*flags, "--session", "nope"])
    assert "no saved session 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --session needs --session_dir
        chat_cli.parse_args(["--mc", "--session", sid])
    assert "add --session_dir" in capsys.readouterr().err


def test_bad_flags_and_missing_checkpoint(env, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        chat_cli.parse_args(["--temperature", "-1"])
    with pytest.raises(SystemExit):
        chat_cli.parse_args(["--max_tok", "5"])  # no abbreviations
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        run_main(["-p", "hi", "--device_type", "cpu"])
    assert "train a model first" in capsys.readouterr().err
