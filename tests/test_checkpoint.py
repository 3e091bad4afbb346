"""Checkpoint manager: roundtrip, atomicity under simulated crashes, corruption errors, cleanup, model rebuild."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nanochat import checkpoint_manager as cm
from nanochat.checkpoint_manager import CheckpointError, latest_step, load_checkpoint, save_checkpoint


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(d, step, seed=0, **kw):
    model, opt = _model_and_opt(seed)
    save_checkpoint(d, step, model.state_dict(), [opt.state_dict()], {"step": step, "note": "hi"},
                    extra_rank_state={"loader": {"rows_done": step * 4}, "cpu_rng": [1, 2, 3]}, **kw)
    return model, opt


def test_roundtrip_model_optimizer_extra(tmp_path):
    d = str(tmp_path / "ckpt")
    model, opt = _save(d, 123)
    assert sorted(os.listdir(d)) == ["step_000123"]
    assert sorted(os.listdir(os.path.join(d, "step_000123"))) == ["meta.json", "model.pt", "optim_rank0.pt", "rank0.json"]
    state, optim_states, meta, extra = load_checkpoint(d, 123, "cpu", load_optimizer=True)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    new_model, new_opt = _model_and_opt(seed=1)
    new_model.load_state_dict(state)
    new_opt.load_state_dict(optim_states[0])
    assert torch.equal(new_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert meta["step"] == 123 and meta["note"] == "hi"
    assert meta["_checkpoint"]["files"]["model.pt"] == os.path.getsize(os.path.join(d, "step_000123", "model.pt"))
    assert extra == {"loader": {"rows_done": 492}, "cpu_rng": [1, 2, 3]}
    # without the optimizer: None, and step=None means the latest
    _, no_opt, _, _ = load_checkpoint(d, None, "cpu")
    assert no_opt is None


def test_latest_step_ignores_tmp_old_and_meta_less_dirs(tmp_path, capsys):
    d = str(tmp_path)
    assert latest_step(d) is None
    assert latest_step(str(tmp_path / "missing")) is None
    _save(d, 100)
    _save(d, 200)
    os.makedirs(os.path.join(d, "step_000300.tmp"))  # an interrupted save
    os.makedirs(os.path.join(d, "step_000250.old"))
    os.makedirs(os.path.join(d, "step_000400"))  # no meta.json: not complete
    open(os.path.join(d, "step_000400", "model.pt"), "w").close()
    os.makedirs(os.path.join(d, "notes"))
    assert latest_step(d) == 200
    assert "step_000400" in capsys.readouterr().out  # warned about, not silently skipped
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load_checkpoint(d, 400, "cpu")
    _save(d, 500)  # the next save cleans the stale leftovers
    assert not os.path.exists(os.path.join(d, "step_000300.tmp"))
    assert not os.path.exists(os.path.join(d, "step_000250.old"))
    assert latest_step(d) == 500


def test_truncated_model_raises_clear_error(tmp_path):
    d = str(tmp_path)
    _save(d, 100)
    _save(d, 200)
    path = os.path.join(d, "step_000200", "model.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, 200, "cpu")
    msg = str(e.value)
    assert path in msg and "corrupt or truncated" in msg
    assert f"delete {os.path.join(d, 'step_000200')}" in msg and "fall back to step 100" in msg and "--resume=100" in msg


def test_corrupt_same_size_file_wraps_torch_load_error(tmp_path):
    d = str(tmp_path)
    _save(d, 7)
    path = os.path.join(d, "step_000007", "model.pt")
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    with pytest.raises(CheckpointError, match="model.pt is corrupt or truncated"):
        load_checkpoint(d, 7, "cpu")
    with open(os.path.join(d, "step_000007", "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="unreadable meta.json"):
        load_checkpoint(d, 7, "cpu")


def test_missing_step_and_missing_optimizer_file(tmp_path):
    d = str(tmp_path)
    _save(d, 5)
    with pytest.raises(CheckpointError, match="no checkpoint for step 6"):
        load_checkpoint(d, 6, "cpu")
    with pytest.raises(CheckpointError, match="optim_rank1.pt.*saved by 1 process"):
        load_checkpoint(d, 5, "cpu", load_optimizer=True, rank=1)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(str(tmp_path / "empty"), None, "cpu")


def test_crash_before_final_rename_keeps_previous(tmp_path, monkeypatch):
    d = str(tmp_path)
    model100, _ = _save(d, 100)
    real_replace = os.replace

    def crashing_replace(src, dst):
        if str(dst).endswith("step_000200"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(cm.os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        _save(d, 200, seed=3)
    monkeypatch.setattr(cm.os, "replace", real_replace)
    assert latest_step(d) == 100
    assert os.path.isdir(os.path.join(d, "step_000200.tmp"))  # complete files but never renamed: ignored
    state, _, _, _ = load_checkpoint(d, latest_step(d), "cpu")
    assert all(torch.equal(state[k], v) for k, v in model100.state_dict().items())


def test_crash_while_writing_a_file_keeps_previous(tmp_path, monkeypatch):
    d = str(tmp_path)
    _save(d, 100)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cm.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _save(d, 200)
    monkeypatch.undo()
    assert latest_step(d) == 100
    load_checkpoint(d, 100, "cpu", load_optimizer=True)


def test_overwrite_same_step_and_keep_last_n(tmp_path):
    d = str(tmp_path)
    _save(d, 100, seed=0)
    model_b, _ = _save(d, 100, seed=5)  # overwrite: the new one wins, no .old left behind
    state, _, _, _ = load_checkpoint(d, 100, "cpu")
    assert all(torch.equal(state[k], v) for k, v in model_b.state_dict().items())
    assert sorted(os.listdir(d)) == ["step_000100"]
    for step in (200, 300, 400):
        _save(d, step, keep_last_n=2)
    assert sorted(os.listdir(d)) == ["step_000300", "step_000400"]
    _save(d, 500, keep_last_n=-1)  # -1 / None: keep all
    assert latest_step(d) == 500 and len(os.listdir(d)) == 3


def test_extra_state_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="JSON-serializable"):
        save_checkpoint(str(tmp_path), 1, {}, None, {}, extra_rank_state={"rng": torch.zeros(2)})


def _dist_worker(rank, world_size, port, d):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    model, opt = _model_and_opt(seed=rank)
    save_checkpoint(d, 10, model.state_dict(), [opt.state_dict()], {"step": 10}, rank=rank, world_size=world_size,
                    extra_rank_state={"rank": rank})
    torch.distributed.destroy_process_group()


def test_two_ranks_write_one_checkpoint(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = str(tmp_path)
    mp.spawn(_dist_worker, args=(2, port, d), nprocs=2, join=True)
    files = sorted(os.listdir(os.path.join(d, "step_000010")))
    assert files == ["meta.json", "model.pt", "optim_rank0.pt", "optim_rank1.pt", "rank0.json", "rank1.json"]
    _, optim1, meta, extra1 = load_checkpoint(d, 10, "cpu", load_optimizer=True, rank=1)
    assert extra1 == {"rank": 1} and meta["_checkpoint"]["world_size"] == 2 and len(optim1) == 1


# ------------------------------------------------------------------------------------------------
# build_model / load_model with the real GPT (skipped until nanochat.gpt exists)


class _FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab_size(self):
        return self.vocab


def test_build_and_load_model(tmp_path, monkeypatch):
    gpt = pytest.importorskip("nanochat.gpt")
    tok_module = pytest.importorskip("nanochat.tokenizer")
    config = gpt.GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = gpt.GPT(config)
    model.init_weights()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # as saved from a compiled model
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    d = os.path.join(str(tmp_path), "base_checkpoints", "d1")
    save_checkpoint(d, 3, state, None, {"model_config": vars(config)})
    monkeypatch.setattr(tok_module, "get_tokenizer", lambda: _FakeTokenizer(64))
    built, tok, meta = cm.load_model("base", "cpu", "eval")  # newest tag, latest step
    assert not built.training and tok.get_vocab_size() == 64 and meta["_checkpoint"]["step"] == 3
    x = torch.randint(0, 64, (1, 8))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(built(x), model(x))
    built_train, _, _ = cm.build_model(d, 3, "cpu", phase="train")
    assert built_train.training
    monkeypatch.setattr(tok_module, "get_tokenizer", lambda: _FakeTokenizer(65))
    with pytest.raises(CheckpointError, match="tokenizer vocab size 65 != model vocab size 64"):
        cm.build_model(d, 3, "cpu")
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        cm.load_model("nope", "cpu", "eval")


def test_find_last_model_tag(tmp_path):
    for i, tag in enumerate(["d4", "d12", "d8"]):
        os.makedirs(tmp_path / tag)
        os.utime(tmp_path / tag, (1000 + i, 1000 + i))
    assert cm.find_last_model_tag(str(tmp_path)) == "d8"
    with pytest.raises(CheckpointError, match="no model tags"):
        cm.find_last_model_tag(str(tmp_path / "nothing"))


def test_meta_records_sizes_of_all_files(tmp_path):
    d = str(tmp_path)
    _save(d, 1)
    with open(os.path.join(d, "step_000001", "meta.json")) as f:
        files = json.load(f)["_checkpoint"]["files"]
    assert set(files) == {"model.pt", "optim_rank0.pt", "rank0.json"}
