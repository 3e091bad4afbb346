"""scripts/mc_recall.py on a tiny MC checkpoint: every focus condition runs through the MC session at a
history far past the GPT's context, the JSON has exact match with a CI per condition, ORACLE opens the
needle's blocks, and a vanilla checkpoint or a bad flag is one clear error."""

import json
import os
from dataclasses import asdict

import pytest
import torch

from mc.config import MCConfig
from mc.eval.data import probe_item
from mc.modules import MCModules, mc_state_dict
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer
from scripts import mc_recall

pytestmark = pytest.mark.usefixtures("single_thread")


def _save_tiny(tmp_path, tok, with_mc=True):
    cfg = GPTConfig(sequence_len=256, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                    prev_token_mix=2, rope_fraction=0.5)
    mc_cfg = MCConfig(block_size=16, recent_tokens=32, train_wc_length=128, infer_refocus_interval=32,
                      gistnet_layers=1, lensnet_layers=1)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    state = model.state_dict()
    meta = {"model_config": asdict(cfg)}
    if with_mc:
        state = {**state, **mc_state_dict(MCModules.from_config(mc_cfg, cfg.n_embd))}
        meta["mc_config"] = asdict(mc_cfg)
    save_checkpoint(str(tmp_path / "base_checkpoints" / ("tinymc" if with_mc else "vanilla")), 1, state, None, meta)


def test_every_condition_runs_through_the_session(tmp_path, monkeypatch, tiny_base_dir, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok = RustBPETokenizer.from_directory(os.path.join(tiny_base_dir, "tokenizer"))
    tok.save(str(tmp_path / "tokenizer"))
    _save_tiny(tmp_path, tok)
    out = tmp_path / "r.json"
    mc_recall.main(["--device_type=cpu", "--model_tag=tinymc", "--histories=1500", "--probes=2",
                    "--turn_tokens=512", f"--out={out}"])
    res = json.loads(out.read_text())
    block = res["histories"]["1500"]
    assert set(block["conditions"]) == {"keymatch", "lensnet", "fixed", "ORACLE"}
    for c in block["conditions"].values():
        assert 0.0 <= c["exact_match"] <= 1.0 and c["n"] == 2 and c["ci95"][0] <= c["ci95"][1]
        assert c["entries_at_answer"] <= 192  # the cap (3/4 of sequence_len = 192), far below the 1,500-token history
    assert block["distance_mean"] > 1000  # needle near the start (--needle_at 0.02)
    assert "ORACLE" in capsys.readouterr().out


def test_oracle_scores_mark_the_needle_blocks(tiny_base_dir):
    tok = RustBPETokenizer.from_directory(os.path.join(tiny_base_dir, "tokenizer"))
    item = probe_item(tok, 0, 1500, 64, 16, "passkey", straddle=False, at=0.02)
    z = mc_recall.needle_scores(item, 1490, 16)
    (a, b), = item.needles
    assert set(torch.nonzero(z[0]).flatten().tolist()) == set(range(a // 16, (b - 1) // 16 + 1))
    assert item.info["distance"] > 1400  # "at" places the needle near the start of the history


def test_vanilla_checkpoint_and_bad_flags_are_one_clear_error(tmp_path, monkeypatch, tiny_base_dir, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok = RustBPETokenizer.from_directory(os.path.join(tiny_base_dir, "tokenizer"))
    tok.save(str(tmp_path / "tokenizer"))
    _save_tiny(tmp_path, tok, with_mc=False)
    with pytest.raises(SystemExit):
        mc_recall.main(["--device_type=cpu", "--model_tag=vanilla", "--histories=600"])
    assert "MegaContext checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mc_recall.main(["--device_type=cpu", "--model_tag=vanilla", "--conditions=FULL"])
    assert "--conditions" in capsys.readouterr().err
