"""Durable MC sessions (mc/infer/store.py) on tiny CPU models:

- a session saved and reopened (a new store, as after a restart) has the same history, plan, entries,
  hysteresis and counters, and the same next-token logits up to float round-off; it keeps going as the
  original does (same tokens in, same logits and the same refocus out)
- a grown tree (LOD3) is grown again on reopen
- what came after the last commit is not history: ids a crash left past it are cut off
- kill -9 at random moments of a writing process: every reopen holds at least what was committed, as a
  prefix of what was written (the full >= 20-kill run: python dev/session_kills.py, lab notebook)
- clear errors: unknown id, bad id, another checkpoint, a session id taken
"""

import os

import pytest
import torch

from mc.infer.session import MCSession
from mc.infer.store import SessionStore, SessionStoreError
from tests.test_mc_session import tiny_mc_model

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = {"source": "base", "model_tag": "tiny", "step": 0}


def same_state(a: MCSession, b: MCSession):
    assert torch.equal(a.token_ids(), b.token_ids()) and torch.equal(a.plan, b.plan)
    for x, y in zip(a.entries(), b.entries()):
        assert torch.equal(x, y)
    assert (a.state is None) == (b.state is None) and (a.state is None or torch.equal(a.state, b.state))
    assert a._since_refocus == b._since_refocus and a.max_lod == b.max_lod and a.W == b.W


def test_reopen_restores_the_session_and_its_logits(tmp_path):
    model, modules, cfg = tiny_mc_model()
    s = MCSession(model, modules, cfg)
    store = SessionStore(str(tmp_path))
    sid = store.create(s, CKPT)
    g = torch.Generator().manual_seed(0)
    for n in (50, 70, 33, 90):  # several turns, each refocused (RandomLens: expansions and collapses)
        s.ingest(torch.randint(0, 256, (n,), generator=g).tolist())
        s.refocus()
        for _ in range(5):
            s.append_token(int(s.next_logits().argmax()))
        store.commit(s)
    assert s.num_tokens > 4 * s.W and s.plan.max() > 0
    before = s.next_logits().clone()

    r = SessionStore(str(tmp_path)).open(sid, model, CKPT)  # a new store: as after a restart
    same_state(s, r)
    torch.testing.assert_close(r.next_logits(), before, atol=1e-4, rtol=1e-4)
    assert r.totals["refocuses"] == s.totals["refocuses"] > 0
    # it keeps going as the original does: new tokens, then a refocus that reads the hysteresis state
    new = torch.randint(0, 256, (7,), generator=g).tolist()
    for session in (s, r):
        session.ingest(new)
    torch.testing.assert_close(r.next_logits(), s.next_logits(), atol=1e-4, rtol=1e-4)
    blocks = torch.zeros(1, s.num_tokens // s.bs)
    blocks[0, 3] = 5.0  # open block 3 (the keymatch path: deterministic, reads and writes the hysteresis)
    for session in (s, r):
        session.refocus(block_scores=blocks)
    same_state(s, r)


def test_reopen_regrows_a_grown_tree(tmp_path):
    model, modules, cfg = tiny_mc_model(max_lod=1, infer_max_lod=3)
    s = MCSession(model, modules, cfg, W=40, refocus_interval=8)
    store = SessionStore(str(tmp_path))
    sid = store.create(s, CKPT)
    s.ingest(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1)).tolist())
    s.refocus()
    assert s.max_lod > 1  # grown past the checkpoint's LOD1
    store.commit(s)
    r = store.open(sid, model, CKPT)
    same_state(s, r)
    torch.testing.assert_close(r.next_logits(), s.next_logits(), atol=1e-4, rtol=1e-4)


def test_what_came_after_the_last_commit_is_cut_off(tmp_path):
    model, modules, cfg = tiny_mc_model()
    s = MCSession(model, modules, cfg)
    store = SessionStore(str(tmp_path))
    sid = store.create(s, CKPT)
    s.ingest(list(range(1, 100)))
    store.commit(s)
    with open(tmp_path / sid / "tokens.bin", "ab") as f:  # a crash mid-commit: ids written, no new state
        f.write(torch.arange(7, dtype=torch.int32).numpy().tobytes())
    assert SessionStore(str(tmp_path)).open(sid, model, CKPT).token_ids().tolist() == list(range(1, 100))
    store2 = SessionStore(str(tmp_path))
    r = store2.open(sid, model, CKPT)
    r.ingest([5, 6])  # it goes on from there: the next commit overwrites the stale ids
    store2.commit(r)
    assert SessionStore(str(tmp_path)).open(sid, model, CKPT).token_ids().tolist() == list(range(1, 100)) + [5, 6]


def test_clear_errors(tmp_path):
    model, modules, cfg = tiny_mc_model()
    store = SessionStore(str(tmp_path))
    sid = store.create(MCSession(model, modules, cfg), CKPT)
    with pytest.raises(SessionStoreError, match="no saved session 'nope'.*newest: " + sid):
        store.open("nope", model, CKPT)
    with pytest.raises(SessionStoreError, match="letters, digits"):
        store.open("../x", model, CKPT)
    with pytest.raises(SessionStoreError, match="runs on checkpoint"):
        store.open(sid, model, {**CKPT, "step": 5})
    with pytest.raises(SessionStoreError, match="already exists"):
        store.create(MCSession(model, modules, cfg), CKPT, session_id=sid)
    assert store.ids() == [sid]


def test_kill_minus_nine_loses_nothing_committed(tmp_path):
    from dev.session_kills import kill_and_reopen

    rows = kill_and_reopen(str(tmp_path), kills=4)  # raises on a lost commit or a damaged history
    lengths = [r["reopened"] for r in rows]
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]
    header, plan, _ = SessionStore._read_state(str(tmp_path / "s"))
    assert header["tokens"] == lengths[-1] == plan.numel()
