"""scripts/mc_bench.py on tiny settings: valid JSON with all three decoders at every history (full attention
skipped with a reason above --max_full_tokens), bounded KV for mc and window, and loading an MC checkpoint."""

import json
import os
from dataclasses import asdict

import pytest
import torch

from mc.config import MCConfig
from mc.modules import MCModules, mc_state_dict
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer
from scripts import mc_bench

TINY = ["--device_type=cpu", "--depth=1", "--width=32", "--head_dim=16", "--max_seq_len=128", "--vocab_size=256",
        "--mc_block_size=8", "--allocator_recent_tokens=16", "--mc_train_wc_length=64",
        "--mc_infer_refocus_interval=16", "--decode_tokens=32", "--rounds=2", "--lensnet_layers=1"]

pytestmark = pytest.mark.usefixtures("single_thread")


def test_bench_writes_all_modes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    mc_bench.main([*TINY, "--histories=200,1500", "--max_full_tokens=1000", "--random_lensnet=1", f"--out={out}"])
    data = json.loads(out.read_text())
    assert (tmp_path / "bench.png").stat().st_size > 1000  # the figure next to the JSON
    rows = {(r["history"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {(h, m) for h in (200, 1500) for m in ("mc", "full", "window")}
    assert "max_full_tokens" in rows[(1500, "full")]["skipped"]
    for (h, mode), r in rows.items():
        if r["skipped"]:
            continue
        assert r["decode_ms"] > 0 and r["cpu_ms"] > 0 and r["decode_tokens"] == 32 and r["state_bytes"] > 0
        assert r["peak_mem_bytes"] >= 0 and r["memory_method"]
        if mode == "full":
            assert r["reprefill_per_token"] == 0 and r["max_kv_entries"] >= h
        else:  # bounded whatever the history
            assert r["max_kv_entries"] <= 64 + 16 and r["reprefill_per_token"] >= 0
    assert rows[(200, "window")]["reprefill_per_token"] == pytest.approx(63 / 16)  # W - 1 per interval
    mc = rows[(1500, "mc")]
    assert mc["refocuses"] > 0 and mc["timed_refocuses"] == 2 and mc["refocus_ms"] > 0
    assert mc["tree_bytes"] > 0 and sum(mc["lod_histogram"]) <= 64 + 16
    assert set(data["summary"]) >= {"mc_spread", "mc_vs_window_max"} and data["mc_config"]["block_size"] == 8
    table = capsys.readouterr().out
    assert "skipped" in table and "refocus ms" in table and "window" in table


def test_bench_loads_an_mc_checkpoint(tmp_path, monkeypatch, tiny_base_dir, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok = RustBPETokenizer.from_directory(os.path.join(tiny_base_dir, "tokenizer"))
    tok.save(str(tmp_path / "tokenizer"))
    cfg = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    mc_cfg = MCConfig(block_size=8, recent_tokens=16, train_wc_length=64, infer_refocus_interval=16, gistnet_layers=1,
                      lensnet_type="none")
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    modules = MCModules.from_config(mc_cfg, cfg.n_embd)
    save_checkpoint(str(tmp_path / "base_checkpoints" / "tinymc"), 3, {**model.state_dict(), **mc_state_dict(modules)},
                    None, {"model_config": asdict(cfg), "mc_config": asdict(mc_cfg)})
    rows = mc_bench.main(["--device_type=cpu", "--model_tag=tinymc", "--histories=300", "--decode_tokens=16",
                          "--rounds=1", "--max_full_tokens=0"])
    assert {r["mode"] for r in rows if not r["skipped"]} == {"mc", "window"}
    assert "lensnet none" in capsys.readouterr().out
    # a vanilla checkpoint is refused with the fix
    save_checkpoint(str(tmp_path / "base_checkpoints" / "vanilla"), 3, model.state_dict(), None,
                    {"model_config": asdict(cfg)})
    with pytest.raises(SystemExit):
        mc_bench.main(["--device_type=cpu", "--model_tag=vanilla", "--histories=100"])
    assert "--mc_enabled=1" in capsys.readouterr().err
