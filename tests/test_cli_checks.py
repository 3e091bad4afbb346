"""Bad command lines and bad checkpoints end in one clear error (issue 14): the argparse validators of
nanochat/cli_checks.py, model tags confined to the checkpoint root, sha256 checksums in meta.json,
weights_only loading of optimizer state, old checkpoints without checksums, nonsense model configs in
meta.json. The full bad-CLI list is scripts/bad_cli.py; here its parse-time cases run in-process (argparse
must refuse each before the script does anything) and a few run as real subprocesses."""

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat import cli_checks as ck
from nanochat.checkpoint_manager import CheckpointError, load_checkpoint, save_checkpoint, step_dir, tag_dir
from nanochat.gpt import GPT, GPTConfig, sample_next_token
from scripts import bad_cli

TINY = dict(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)


# ------------------------------------------------------------------------------------------------ validators
@pytest.mark.parametrize("fn, good, bad", [
    (ck.positive_int, [("1", 1), (" 7 ", 7)], ["0", "-1", "1.5", "x", ""]),
    (ck.nonneg_int, [("0", 0), ("3", 3)], ["-1", "nan"]),
    (ck.positive_int_or_off, [("-1", -1), ("1", 1)], ["0", "-2"]),
    (ck.nonneg_int_or_off, [("-1", -1), ("0", 0)], ["-2"]),
    (ck.finite_float, [("-1.5", -1.5), ("0", 0.0)], ["nan", "inf", "-inf", "x"]),
    (ck.nonneg_float, [("0", 0.0), ("0.02", 0.02)], ["-0.1", "nan", "inf"]),
    (ck.positive_float, [("0.5", 0.5)], ["0", "-1", "nan"]),
    (ck.temperature, [("0", 0.0), ("1.3", 1.3)], ["-0.5", "nan", "inf"]),
    (ck.top_k, [("0", 0), ("50", 50)], ["-1", "5.5"]),
    (ck.port, [("1", 1), ("8000", 8000), ("65535", 65535)], ["0", "65536", "99999", "-80", "http"]),
    (ck.model_tag, [("d12", "d12"), ("d4_mc", "d4_mc"), ("run-1.5", "run-1.5"), ("", "")],
     ["../x", "..", ".", "a/b", "/abs", "a\\b", "x..y", ".hidden", "with space", "a" * 200]),
])
def test_validators(fn, good, bad):
    for text, value in good:
        assert fn(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_argparse_error_is_one_line_with_the_flag():
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--depth", type=ck.positive_int, default=20)
    assert p.parse_args([]).depth == 20  # defaults are kept (and not re-validated)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        p.parse_args(["--depth=0"])
    assert e.value.code == 2
    assert "error: argument --depth: must be an integer >= 1, got '0'" in err.getvalue()


class _Parsed(Exception):
    """Raised instead of returning from a parse: the script must never get past argparse in these cases."""


@pytest.mark.parametrize("case", [c for c in bad_cli.CASES if c.kind == "parse"], ids=str)
def test_parse_cases_fail_in_argparse(case, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, *a, **kw):
        original(self, *a, **kw)
        raise _Parsed(f"argparse accepted: {case}")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    module = importlib.import_module(f"scripts.{case.module}")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        module.main(list(case.args))
    assert e.value.code == 2, err.getvalue()
    assert "error:" in err.getvalue() and case.expect.lower() in err.getvalue().lower(), err.getvalue()


def test_bad_cli_lists_enough_cases():
    assert len(bad_cli.CASES) >= 60 and len(set(bad_cli.CASES)) == len(bad_cli.CASES)


@pytest.mark.parametrize("argv", [
    ("base_train", "--depth=0"), ("base_train", "--device_batch_size=0"), ("chat_web", "--port", "99999"),
    ("chat_cli", "-t", "nan"), ("chat_cli", "-g", "../../x"),
])
def test_issue_examples_as_subprocesses(argv, tmp_path):
    verdict, detail = bad_cli.run_case(bad_cli.Case(argv[0], argv[1:], "error: argument"), str(tmp_path), 120)
    assert verdict == "ok", detail


def test_bad_checkpoints_as_subprocesses(tmp_path):
    bad_cli.build_fixture(str(tmp_path))
    for tag, expect in (("badhead", "n_head=0"), ("flipped", "sha256")):
        case = bad_cli.Case("chat_cli", ("-g", tag, "-p", "hi", "--device_type", "cpu"), expect, "run")
        verdict, detail = bad_cli.run_case(case, str(tmp_path), 120)
        assert verdict == "ok", detail


# ------------------------------------------------------------------------------------------------ tags
def test_tag_dir_confines_tags(tmp_path):
    root = str(tmp_path / "base_checkpoints")
    assert tag_dir(root, "d12") == os.path.join(root, "d12")
    for tag in ["../x", "..", ".", "", "a/b", "/etc", "x/../../y", None]:
        with pytest.raises(ValueError, match="--source_tag"):
            tag_dir(root, tag, "--source_tag")
    # an operator's symlink inside the root still works (the check is on the name, not the target)
    os.makedirs(root)
    os.makedirs(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", os.path.join(root, "linked"))
    assert tag_dir(root, "linked") == os.path.join(root, "linked")


def test_load_model_refuses_escaping_tag(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    save_checkpoint(str(tmp_path / "outside"), 1, {}, None, {})  # a checkpoint folder outside the base dir
    with pytest.raises(ValueError, match="--model_tag='../../outside'"):
        cm.load_model("base", "cpu", "eval", model_tag="../../outside")


# ------------------------------------------------------------------------------------------------ checksums
def _gpt_and_optimizers():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    model.init_weights()
    optimizers = model.setup_optimizers()
    x = torch.randint(0, 32, (2, 16))
    model(x, targets=x).backward()
    for opt in optimizers:
        opt.step()
    return model, optimizers


def _save(d, model, optimizers, step=1):
    save_checkpoint(d, step, model.state_dict(), [o.state_dict() for o in optimizers],
                    {"model_config": dataclasses.asdict(model.config)}, extra_rank_state={"loader": 3})


def _flip_byte(path, offset=-100):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        b = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x01]))


def test_meta_records_sha256_of_every_file(tmp_path):
    d = str(tmp_path)
    _save(d, *_gpt_and_optimizers())
    meta = cm.read_meta(d, 1)
    sha = meta["_checkpoint"]["sha256"]
    assert set(sha) == set(meta["_checkpoint"]["files"]) == {"model.pt", "optim_rank0.pt", "rank0.json"}
    for name, digest in sha.items():
        assert cm.file_sha256(os.path.join(step_dir(d, 1), name)) == digest


@pytest.mark.parametrize("name", ["model.pt", "optim_rank0.pt", "rank0.json"])
def test_one_flipped_byte_is_a_clear_error(tmp_path, name):
    d = str(tmp_path)
    _save(d, *_gpt_and_optimizers())
    path = os.path.join(step_dir(d, 1), name)
    _flip_byte(path, -2 if name.endswith(".json") else -100)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, 1, "cpu", load_optimizer=True)
    msg = str(e.value)
    assert path in msg and "sha256" in msg and "meta.json recorded" in msg and f"delete {step_dir(d, 1)}" in msg


def test_only_the_files_loaded_are_hashed(tmp_path):
    d = str(tmp_path)
    _save(d, *_gpt_and_optimizers())
    _flip_byte(os.path.join(step_dir(d, 1), "optim_rank0.pt"))
    load_checkpoint(d, 1, "cpu")  # no optimizer: its file is not read, so not checked
    with pytest.raises(CheckpointError, match="optim_rank0.pt"):
        load_checkpoint(d, 1, "cpu", load_optimizer=True)


def test_checkpoint_without_checksums_still_loads(tmp_path):
    """Checkpoints saved before checksums existed: no "sha256" in meta.json, loaded without a check."""
    d = str(tmp_path)
    model, optimizers = _gpt_and_optimizers()
    _save(d, model, optimizers)
    meta_path = os.path.join(step_dir(d, 1), "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["_checkpoint"]["sha256"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    state, optim_states, _, extra = load_checkpoint(d, 1, "cpu", load_optimizer=True)
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight) and extra == {"loader": 3}
    assert len(optim_states) == 2


# ------------------------------------------------------------------------------------------------ weights_only
def test_optimizer_state_loads_with_weights_only(tmp_path, monkeypatch):
    d = str(tmp_path)
    model, optimizers = _gpt_and_optimizers()
    _save(d, model, optimizers)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real_load(*a, **kw))
    _, optim_states, _, _ = load_checkpoint(d, 1, "cpu", load_optimizer=True)
    assert calls == [True, True]  # model.pt and optim_rank0.pt
    fresh_model, fresh_opts = _gpt_and_optimizers()
    for opt, state in zip(fresh_opts, optim_states):
        opt.load_state_dict(state)  # AdamW and Muon state_dicts: plain dicts, lists, numbers, tensors
    assert fresh_opts[1].param_groups[0]["initial_lr"] == optimizers[1].param_groups[0]["initial_lr"]


@dataclasses.dataclass
class _NotAllowed:
    x: int = 1


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path):
    """weights_only=True: a file holding an arbitrary Python object is refused, not unpickled (no code runs)."""
    d = str(tmp_path)
    save_checkpoint(d, 1, {"w": torch.zeros(2)}, [{"state": {}, "param_groups": [], "evil": _NotAllowed()}], {})
    with pytest.raises(CheckpointError, match="optim_rank0.pt"):
        load_checkpoint(d, 1, "cpu", load_optimizer=True)


# ------------------------------------------------------------------------------------------------ model config
@pytest.mark.parametrize("field, value, expect", [
    ("n_head", 0, "n_head=0"), ("n_layer", 0, "n_layer=0"), ("n_embd", -8, "n_embd=-8"),
    ("vocab_size", "big", "vocab_size='big'"), ("n_head", 3, "divisible by n_head=3"), ("bogus", 1, "bogus"),
])
def test_nonsense_model_config_names_meta_json(tmp_path, field, value, expect):
    model = GPT(GPTConfig(**TINY))
    model.init_weights()
    d = str(tmp_path)
    save_checkpoint(d, 1, model.state_dict(), None, {"model_config": {**TINY, field: value}})
    with pytest.raises(CheckpointError) as e:
        cm.build_model(d, 1, "cpu")
    assert os.path.join(step_dir(d, 1), "meta.json") in str(e.value) and expect in str(e.value)


def test_gpt_config_refuses_nonpositive_sizes():
    for field in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
        with pytest.raises(ValueError, match=f"{field}=0"):
            GPTConfig(**{**TINY, field: 0})
    with pytest.raises(ValueError, match="softcap"):
        GPTConfig(**TINY, softcap=float("nan"))


def test_top_k_zero_samples_from_every_token():
    logits = torch.zeros(1, 5)
    rng = torch.Generator().manual_seed(0)
    ids = {int(sample_next_token(logits, rng, 1.0, 0)) for _ in range(200)}
    assert ids == set(range(5))
