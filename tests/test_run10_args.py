"""
run10.sh's command lines, without training anything: the recipe runs in a scratch copy whose
.venv/bin/python and mc_setup are stubs that log their arguments, so each stage's flags can be read.

- --data_dir PATH / --data_dir=PATH (relative to where run10.sh is started) reaches the stages that read
  the pretraining text (tok_train, tok_eval, base_train, base_loss) as an absolute --data_dir, base_train
  gets --source=dir, and the chat half keeps the offline mixtures
- conflicts (--source fineweb, --recall, --quality, a missing folder, --source dir alone) are one error
- a tokenizer trained on another corpus (tokenizer/trained_on.txt) is retrained, the same one is reused
- the recipe's cadence values keep their meaning under "bare integer = steps": none is a bare count
- the chat half ends with RL and its chat eval (the offline recall task; GSM8K on FineWeb); SKIP_RL=1 stops
  after SFT
"""

import os
import shutil
import subprocess

import pytest

from nanochat.cadence import CADENCE_FLAGS, parse_cadence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = """#!/usr/bin/env bash
echo "$*" >> "$RUN10_LOG"
if [ "$1" = -c ]; then echo 2048; fi  # tokenizer_ready asks for the vocab size
"""


@pytest.fixture
def recipe(tmp_path):
    root = tmp_path / "repo"
    (root / "dev").mkdir(parents=True)
    (root / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "run10.sh"), root / "run10.sh")
    shutil.copy(os.path.join(REPO, "dev", "recipe_common.sh"), root / "dev" / "recipe_common.sh")
    for stub in (root / ".venv" / "bin" / "python", root / "mc_setup"):
        stub.write_text(STUB)
        stub.chmod(0o755)
    (tmp_path / "work" / "books").mkdir(parents=True)
    (tmp_path / "work" / "books" / "book.txt").write_text("text\n")
    return tmp_path


def run10(tmp_path, *args, cwd="work"):
    """(exit code, stderr, {stage: its arguments}) of one run10.sh call, started in tmp_path/cwd."""
    log = tmp_path / "calls.log"
    log.write_text("")
    env = dict(os.environ, RUN10_LOG=str(log), NANOCHAT_BASE_DIR=str(tmp_path / "base"), WANDB_RUN="dummy")
    r = subprocess.run(["bash", str(tmp_path / "repo" / "run10.sh"), *args], cwd=tmp_path / cwd, env=env,
                       capture_output=True, text=True, timeout=60)
    stages = {}
    for line in log.read_text().splitlines():
        words = line.split()
        if words[:1] == ["-m"]:
            stages.setdefault(words[1], words[2:])
    return r.returncode, r.stdout + r.stderr, stages


@pytest.mark.parametrize("form", [["--data_dir", "books"], ["--data_dir=books"], ["--data_dir=./books/"]])
def test_data_dir_reaches_the_text_stages(recipe, form):
    rc, out, stages = run10(recipe, "--gpu", "cpu", *form)
    assert rc == 0, out
    flag = f"--data_dir={os.path.realpath(recipe / 'work' / 'books')}"
    for stage in ("scripts.tok_train", "scripts.tok_eval", "scripts.base_train", "scripts.base_loss"):
        assert flag in stages[stage], stage
    assert "--source=dir" in stages["scripts.base_train"] and "--source=dir" in stages["scripts.base_loss"]
    assert "--mixture=offline" in stages["scripts.mid_train"]
    assert "--online" not in stages["scripts.chat_eval"]
    assert "nanochat.dataset" not in stages  # nothing to download


@pytest.mark.parametrize("args, message", [
    (["--data_dir", "books", "--source", "fineweb"], "--data_dir trains on your own files (source dir), --source fineweb"),
    (["--source=synthetic", "--data_dir=books"], "--source synthetic on another corpus; drop one"),
    (["--recall", "--data_dir", "books"], "--recall trains on the built-in recall corpus; drop --data_dir"),
    (["--profile", "mc", "--quality", "--data_dir", "books"], "--quality runs on the synthetic corpus"),
    (["--data_dir", "no_such_folder"], "no_such_folder is not a folder"),
    (["--source", "dir"], "--source dir reads your own files: add --data_dir PATH"),
    (["--data_dir"], "--data_dir needs a folder"),
])
def test_conflicts_are_one_clear_error(recipe, args, message):
    rc, out, stages = run10(recipe, "--gpu", "cpu", *args)
    assert rc == 2 and message in out, out
    assert not stages  # refused before anything ran


def test_source_dir_with_data_dir_is_fine(recipe):
    rc, out, stages = run10(recipe, "--gpu", "cpu", "--source", "dir", "--data_dir", "books")
    assert rc == 0, out
    assert "--source=dir" in stages["scripts.base_train"]


def test_tokenizer_of_another_corpus_is_retrained(recipe):
    tok = recipe / "base" / "tokenizer"
    tok.mkdir(parents=True)
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        (tok / name).write_text("")
    (tok / "trained_on.txt").write_text("synthetic\n")
    rc, out, stages = run10(recipe, "--gpu", "cpu")
    assert rc == 0 and "skip tokenizer" in out and "scripts.tok_train" not in stages, out
    rc, out, stages = run10(recipe, "--gpu", "cpu", "--data_dir", "books")
    assert rc == 0 and "was trained on synthetic, this run reads dir " in out and "scripts.tok_train" in stages, out
    (tok / "trained_on.txt").write_text(f"dir {os.path.realpath(recipe / 'work' / 'books')}\n")
    rc, out, stages = run10(recipe, "--gpu", "cpu", "--data_dir", "books")
    assert rc == 0 and "skip tokenizer" in out and "scripts.tok_train" not in stages, out
    (tok / "trained_on.txt").unlink()  # a tokenizer from before the record: fine for the built-in corpora only
    rc, out, stages = run10(recipe, "--gpu", "cpu")
    assert "scripts.tok_train" not in stages, out
    rc, out, stages = run10(recipe, "--gpu", "cpu", "--data_dir", "books")
    assert "an unrecorded corpus" in out and "scripts.tok_train" in stages, out


def _parsers():
    from scripts import base_train, chat_rl, mid_train, tok_train
    from tasks.mixtures import add_mid_mixture_flags, add_sft_mixture_flags

    return {"scripts.base_train": base_train.build_parser().parse_args,
            "scripts.chat_rl": chat_rl.build_parser().parse_args,
            "scripts.mid_train": mid_train.build_parser("mid", add_mid_mixture_flags).parse_args,
            "scripts.chat_sft": mid_train.build_parser("sft", add_sft_mixture_flags).parse_args,
            "scripts.tok_train": tok_train.parse_args}


@pytest.mark.parametrize("args", [["--gpu", "cpu"], ["--gpu", "cpu", "--recall"], ["--gpu", "cpu", "--mc", "--quality"],
                                  ["--gpu", "h100"], ["--gpu", "h100", "--mc", "--quality"],
                                  ["--gpu", "cpu", "--mc", "--data_dir", "books"]])
def test_recipe_cadences_keep_their_token_meaning(recipe, args):
    """Every cadence the recipe passes is a token count with a unit (or off): under the upstream rule a bare
    655360 would be 655,360 steps. And each trainer's parser accepts the recipe's command line."""
    rc, out, stages = run10(recipe, *args)
    assert rc == 0, out
    for stage, parse in _parsers().items():
        if stage in stages:
            parse(stages[stage])
    seen = 0
    for stage in ("scripts.base_train", "scripts.mid_train", "scripts.chat_sft"):
        for word in stages.get(stage, []):
            name, _, value = word.removeprefix("--").partition("=")
            if name in CADENCE_FLAGS:
                cadence = parse_cadence(value)
                assert cadence.unit == "tokens" or cadence.count <= 0, (stage, word)
                seen += 1
    assert seen >= 3


def _calls(tmp_path):
    return [line.split() for line in (tmp_path / "calls.log").read_text().splitlines() if line.startswith("-m ")]


@pytest.mark.parametrize("args, task", [(["--gpu", "cpu"], "synthetic"), (["--gpu", "h100", "--source", "fineweb"], "gsm8k")])
def test_the_chat_half_ends_with_rl_and_its_eval(recipe, args, task):
    rc, out, stages = run10(recipe, *args)
    assert rc == 0, out
    modules = [c[1] for c in _calls(recipe)]
    sft = modules.index("scripts.chat_sft")
    assert modules[sft:sft + 4] == ["scripts.chat_sft", "scripts.chat_eval", "scripts.chat_rl", "scripts.chat_eval"]
    rl = [c for c in _calls(recipe) if c[1] == "scripts.chat_rl"][0]
    assert f"--task={task}" in rl and "--resume=auto" in rl
    assert ["-i", "rl"] == [c for c in _calls(recipe) if c[1] == "scripts.chat_eval"][-1][2:4]
    assert "chat_cli -i rl" in out


def test_skip_rl_stops_after_sft(recipe, monkeypatch):
    monkeypatch.setenv("SKIP_RL", "1")
    rc, out, stages = run10(recipe, "--gpu", "cpu")
    assert rc == 0 and "scripts.chat_rl" not in stages and "chat_cli -i sft" in out, out
