"""The tree on disk (--mc_tree disk, mc/mapped.py): growable memory-mapped rows keep what was written across
growth and release; a disk tree holds the same gists as the RAM tree; a disk session gives the RAM session's
logits and plans, leaves no file behind, and holds its history outside anonymous memory."""

import os

import pytest
import torch

from mc.config import MCConfig
from mc.infer.session import MCSession
from mc.infer.store import SessionStore
from mc.mapped import MappedRows
from mc.train.controller import MCController
from mc.tree import MegaContextTree
from tests.test_mc_session import tiny_mc_model
from tests.test_mc_store import CKPT, same_state

pytestmark = pytest.mark.usefixtures("single_thread")


def test_mapped_rows_keep_their_data_across_growth_and_release(tmp_path):
    rows = MappedRows(str(tmp_path), torch.float32, (3,))
    assert os.listdir(tmp_path) == []  # unlinked at once: nothing to clean up, even after a kill
    data = rows.reserve(10)
    data[:10] = torch.arange(30.0).view(10, 3)
    rows.release()
    grown = rows.reserve(1000)
    assert grown.size(0) >= 1000 and torch.equal(grown[:10], torch.arange(30.0).view(10, 3))
    grown[999] = 7.0
    rows.release()
    assert torch.equal(rows.reserve(5)[:10], torch.arange(30.0).view(10, 3)) and bool((rows.data[999] == 7).all())
    ids = MappedRows(str(tmp_path), torch.int8)
    ids.reserve(3)[:3] = torch.tensor([1, -1, 2], dtype=torch.int8)
    assert ids.data[:3].tolist() == [1, -1, 2]


def test_a_disk_tree_holds_the_ram_trees_gists(tmp_path):
    model, modules, cfg = tiny_mc_model()
    g = torch.Generator().manual_seed(0)
    ram = MegaContextTree(modules.gistnet, 8, 2, cache_lod0=False)
    disk = MegaContextTree(modules.gistnet, 8, 2, cache_lod0=False, disk_dir=str(tmp_path))
    with torch.no_grad():
        for n in (5, 70, 1, 300, 8):  # appends that cross blocks, levels and the buffers' growth
            x = torch.randn(1, n, 32, generator=g)
            ram.append(x)
            disk.append(x)
        ram.grow(), disk.grow()
        x = torch.randn(1, 600, 32, generator=g)
        ram.append(x), disk.append(x)
    for level in range(1, 4):
        assert torch.equal(ram.level(level), disk.level(level))
    with pytest.raises(ValueError, match="one history"):
        MegaContextTree(modules.gistnet, 8, 2, disk_dir=str(tmp_path)).append(torch.randn(2, 8, 32))


def test_a_disk_session_is_the_ram_session(tmp_path):
    model, modules, cfg = tiny_mc_model(seed=2)
    ram = MCSession(model, modules, cfg)
    model, modules, cfg = tiny_mc_model(seed=2)  # its own RandomLens: the same scores call for call
    disk = MCSession(model, modules, cfg, tree="disk", tree_dir=str(tmp_path))
    g = torch.Generator().manual_seed(2)
    for n in (300, 40, 7, 900):  # the last one grows the tree past max_lod
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        ram.ingest(ids), disk.ingest(ids)
        ram.refocus(), disk.refocus()
        assert torch.equal(ram.plan, disk.plan) and torch.equal(ram.token_ids(), disk.token_ids())
        torch.testing.assert_close(ram.next_logits(), disk.next_logits())
    for tok in ram.generate(30, seed=1):
        disk.append_token(tok)
    torch.testing.assert_close(ram.next_logits(), disk.next_logits())
    assert os.listdir(tmp_path) == []
    assert disk.stats()["mapped_bytes"] > 0 == ram.stats()["mapped_bytes"]
    mem = disk.memory_bytes()
    assert mem["mapped"] >= 5 * disk.num_tokens  # ids (4 B) + plan (1 B) per token, and the gists, in files
    assert mem["tree"] + mem["history"] < ram.memory_bytes()["tree"] + ram.memory_bytes()["history"]


def test_the_keymatch_focus_on_disk_keeps_its_keys_there(tmp_path):
    model, modules, cfg = tiny_mc_model(seed=4)
    ram = MCSession(model, modules, cfg, focus="keymatch")
    disk = MCSession(model, modules, cfg, focus="keymatch", tree="disk", tree_dir=str(tmp_path))
    ids = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(4)).tolist()
    for s in (ram, disk):
        s.ingest(ids)
        s.refocus()
    assert torch.equal(ram.plan, disk.plan) and disk.keys.nbytes() == 0 < disk.keys.mapped_bytes()
    assert torch.equal(ram.keys.view(), disk.keys.view())
    torch.testing.assert_close(ram.next_logits(), disk.next_logits())


def test_disk_is_for_inference_and_the_flag_is_checked():
    with pytest.raises(ValueError, match="--mc_tree"):
        MCConfig(tree="tape")
    model, modules, cfg = tiny_mc_model()
    with pytest.raises(ValueError, match="--mc_tree=disk is for inference"):
        MCController(model, modules, MCConfig(**{**cfg.__dict__, "tree": "disk"}))


def test_a_saved_disk_session_reopens_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))  # the reopened tree's files: base/mc_tree
    model, modules, cfg = tiny_mc_model()
    s = MCSession(model, modules, cfg, tree="disk", tree_dir=str(tmp_path / "tree"))
    store = SessionStore(str(tmp_path / "sessions"))
    sid = store.create(s, CKPT)
    s.ingest(torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0)).tolist())
    s.refocus()
    store.commit(s)
    r = SessionStore(str(tmp_path / "sessions")).open(sid, model, CKPT)
    assert r.cfg.tree == "disk" and r.memory_bytes()["mapped"] > 0 and os.listdir(tmp_path / "base/mc_tree") == []
    same_state(s, r)
    torch.testing.assert_close(r.next_logits(), s.next_logits(), atol=1e-4, rtol=1e-4)
