"""Tests for mc/infer/session.py (MegaContext inference) on tiny CPU models:
- a history 12x the model's sequence_len (past the GPT's rotary table) ingests and decodes; the WC never
  exceeds W (so neither does the KV cache, W <= sequence_len), the WC is a legal full covering, and its
  embeddings equal build_working_context over the tree (the budget itself: tests/test_mc_session_budget.py)
- after every refocus the partially re-prefilled KV cache gives the same logits as a from-scratch
  forward of the whole WC; the re-prefill count = entries from the first changed entry
- the attended entries stay bounded as the history grows (behaviour, not timing)
- fixed focus (lensnet None), telemetry events with the documented fields, clear errors
"""

import dataclasses

import pytest
import torch

from mc.config import MCConfig
from mc.focus import refocus as focus_refocus
from mc.infer.session import HistoryTooLongError, MCSession, MCSessionError
from mc.modules import MCModules, attach
from mc.ops.telemetry import SCHEMAS
from mc.positions import wc_cos_sin
from mc.working_context import build_working_context, check_invariants, check_plan
from nanochat.engine import ContextTooLongError
from nanochat.gpt import GPT, GPTConfig

SEQ = 64
MC = dict(block_size=8, max_lod=2, recent_tokens=8, train_wc_length=40, infer_refocus_interval=16,
          gistnet_layers=1, lensnet_layers=1)

pytestmark = pytest.mark.usefixtures("single_thread")


class RandomLens(torch.nn.Module):
    """Stands in for a trained LensNet: scores in [-1, 1] that vary with the entry and with every call, so
    refocuses expand and collapse (a fresh LensNet scores 0 and never edits)."""

    def __init__(self, seed=0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls, self.seed = 0, seed

    def forward(self, embeddings=None, lod=None, span_start=None, span_len=None, valid=None):
        self.calls += 1
        g = torch.Generator().manual_seed(self.seed * 1000 + self.calls)
        scores = torch.rand(span_start.shape, generator=g) * 2 - 1
        return (scores.to(embeddings.device) * valid).to(self.anchor.dtype)


def tiny_mc_model(seed=0, vocab=256, lensnet="transformer", random_lens=True, positional_type="gaussian", **mc):
    """A 2-layer GPT (every path non-zero, so a stale cache changes the logits) with GistNet and, by default,
    a RandomLens in LensNet's place (lensnet="none": fixed focus; random_lens=False: a real fresh LensNet)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=SEQ, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
    cfg = MCConfig(**{**MC, "lensnet_type": lensnet, "positional_type": positional_type, **mc})
    modules = MCModules.from_config(cfg, 32)
    if modules.lensnet is not None and random_lens:
        modules.lensnet = RandomLens(seed)
    attach(model, modules, cfg)
    return model.eval(), modules.eval(), cfg


def scratch_logits(session):
    """Next-token logits from a full forward of the current WC, no cache (built by the library functions)."""
    wc = session.working_context()
    cos, sin = wc_cos_sin(wc, session.head_dim, session.cfg.positional_type)
    with torch.no_grad():
        return session.model(inputs_embeds=wc.embeddings, cos_sin_override=(cos, sin))[0, -1]


def check_wc(session):
    T = session.num_tokens
    check_plan(session.plan, session.bs, session.max_lod)
    wc = session.working_context()
    check_invariants(wc, T, session.bs, max_len=session.max_entries, max_lod=session.max_lod)
    # the session's embeddings = build_working_context over [wte(all ids), LOD1, LOD2] of the tree
    with torch.no_grad():
        lod0 = session.model.transformer.wte(session.token_ids().long())[None]
    ref = build_working_context(session.plan, [lod0] + session.tree.levels[1:], session.bs, align="left")
    assert torch.equal(ref.span_start, wc.span_start) and torch.equal(ref.lod, wc.lod)
    torch.testing.assert_close(ref.embeddings, wc.embeddings)


def test_long_history_bounded_and_exact():
    model, modules, cfg = tiny_mc_model()
    s = MCSession(model, modules, cfg)
    assert s.W == 40 + 16 and s.fit_budget == 40 and s.refocus_interval == 16 and s.W <= SEQ
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (300,), generator=g).tolist()
    s.ingest(prompt)  # > W entries at once: hard fit, then LensNet
    assert s.num_entries <= s.fit_budget
    s.refocus()
    check_wc(s)
    refocuses, edits = 0, 0
    for turn in range(4):
        s.ingest(torch.randint(0, 256, (int(torch.randint(20, 150, (1,), generator=g)),), generator=g).tolist())
        s.refocus()
        for tok in s.generate(60, temperature=1.0, seed=turn):
            assert 0 <= tok < 256
            assert s.num_entries <= s.max_entries == s.W
            if s.stats()["refocuses"] > refocuses:  # a refocus just ran: compare with a from-scratch forward
                refocuses = s.stats()["refocuses"]
                edits += s.last["expands"] + s.last["collapses"]
                torch.testing.assert_close(s.next_logits(), scratch_logits(s), atol=2e-5, rtol=1e-4)
        check_wc(s)
    st = s.stats()
    assert st["history_tokens"] > 12 * SEQ > 10 * SEQ  # past the GPT's own rotary table (10 x sequence_len)
    assert st["max_kv_entries"] <= s.W <= SEQ
    assert st["expands"] > 0 and st["collapses"] + st["forced"] > 0 and edits > 0  # the focus really moved
    assert st["reprefill_entries"] > 0 and st["generated_tokens"] == 240
    assert st["lod_histogram"][2] > 0  # LOD2 gists in use
    assert 0 < st["bytes_per_token"] < 200  # no C floats per token (LOD0 is not stored)
    torch.testing.assert_close(s.next_logits(), scratch_logits(s), atol=2e-5, rtol=1e-4)


def test_the_sessions_entry_list_refocus_makes_the_per_token_refocus_edits():
    """The session refocuses on its entry list (mc/entry_allocator.py, O(W)); mc.focus.refocus on the whole
    per-token plan, given the same scores, hysteresis and random draws, makes the same plan and state."""
    model, modules, cfg = tiny_mc_model(seed=3, allocator_type="stochastic_greedy")
    s = MCSession(model, modules, cfg)
    g = torch.Generator().manual_seed(3)
    s.ingest(torch.randint(0, 256, (500,), generator=g).tolist())
    edits = 0
    for _ in range(12):
        s.ingest(torch.randint(0, 256, (5,), generator=g).tolist())  # under the interval: no refocus yet
        plan, state, L = s.plan.clone(), s.state, s.num_entries
        twin = RandomLens(seed=3)
        twin.calls = s.lensnet.calls  # the same scores as the session's next call
        draws = torch.Generator()
        draws.set_state(s.generator.get_state())
        want, want_state, _ = focus_refocus(twin, plan, None, s.cfg, s.fit_budget, state=state, generator=draws,
                                            wc=s.working_context())
        s.refocus()
        edits += s.last["expands"] + s.last["collapses"]
        assert L <= s.W and torch.equal(s.plan, want) and torch.equal(s.state, want_state)
    assert edits >= 4  # the focus really moved (8 edits on this seed)


def test_reprefill_from_first_changed_entry():
    model, modules, cfg = tiny_mc_model(seed=1, positional_type="simple")
    s = MCSession(model, modules, cfg, refocus_interval=24, W=60)  # refocused to 36 entries
    s.ingest(torch.randint(0, 256, (400,)).tolist())
    s.refocus_interval = 10**9  # refocus by hand after every token below
    seen = 0
    for step in range(150):
        s.next_logits()  # the cache is up to date
        before = s.kv.get_pos()
        assert before == s.num_entries
        s.ingest([int(torch.randint(0, 256, (1,)))])
        keys = list(zip(*(x.tolist() for x in s.entries())))
        info = s.refocus()
        new_keys = list(zip(*(x.tolist() for x in s.entries())))
        prefix = next((i for i, (a, b) in enumerate(zip(keys, new_keys)) if a != b), min(len(keys), len(new_keys)))
        # the first changed entry from first_changed_token = the common prefix of the entry lists
        assert info["first_changed_entry"] == prefix
        assert s.kv.get_pos() == min(prefix, before)
        # re-prefilled = entries from the first changed one up to the end of what the cache held
        covered_before = sum(1 for st, _ in new_keys if st < s.num_tokens - 1)
        assert info["reprefill_entries"] == max(covered_before - min(prefix, before), 0)
        if info["reprefill_entries"]:
            seen += 1
            fwd = s.stats()["forward_entries"]
            torch.testing.assert_close(s.next_logits(), scratch_logits(s), atol=2e-5, rtol=1e-4)
            assert s.stats()["forward_entries"] - fwd == s.num_entries - min(prefix, before)
    assert seen >= 5


def test_attended_entries_do_not_grow_with_history():
    model, modules, cfg = tiny_mc_model(seed=2)
    peaks, per_token = [], []
    for history in (100, 900):
        s = MCSession(model, modules, cfg)
        s.ingest(torch.randint(0, 256, (history,)).tolist())
        s.refocus()
        s.next_logits()
        base = s.stats()["forward_entries"]
        list(s.generate(64, temperature=1.0))
        st = s.stats()
        peaks.append(st["max_kv_entries"])
        per_token.append((st["forward_entries"] - base) / 64)
        assert st["max_kv_entries"] <= s.W
    assert max(peaks) <= MC["train_wc_length"] + MC["infer_refocus_interval"]
    # entries pushed through the GPT per generated token: 1 + re-prefill, bounded by W / interval + 1
    assert all(p <= 1 + (40 + 16) / 16 for p in per_token), per_token


def test_fixed_focus_without_lensnet():
    model, modules, cfg = tiny_mc_model(seed=3, lensnet="none")
    assert modules.lensnet is None
    s = MCSession(model, modules, cfg)
    s.ingest(torch.randint(0, 256, (500,)).tolist())
    s.refocus()
    list(s.generate(40, temperature=0.0))
    st = s.stats()
    assert st["expands"] == 0 and st["collapses"] == 0 and st["forced"] > 0  # only the hard fit edits
    assert st["max_kv_entries"] <= s.max_entries
    check_wc(s)
    torch.testing.assert_close(s.next_logits(), scratch_logits(s), atol=2e-5, rtol=1e-4)
    # greedy decoding is deterministic
    s2 = MCSession(model, modules, cfg)
    s2.ingest(s.token_ids()[:500].tolist())
    s2.refocus()
    assert list(s2.generate(40, temperature=0.0)) == s.token_ids()[500:].tolist()


class Recorder:
    def __init__(self):
        self.events = []

    def emit(self, event):
        self.events.append(event)

    def flush(self):
        return True

    def shutdown(self):
        pass


def test_telemetry_events():
    model, modules, cfg = tiny_mc_model(seed=4, random_lens=False)  # the real LensNet (fresh: scores 0)
    rec = Recorder()
    s = MCSession(model, modules, cfg, telemetry=rec, session_id="abc")
    s.ingest(torch.randint(0, 256, (200,)).tolist())
    s.refocus()
    list(s.generate(40))
    kinds = [e.event_type for e in rec.events]
    n = s.stats()["refocuses"]
    for kind in ("focus_allocator", "inference_update", "mc_tree_snapshot", "working_context_snapshot"):
        assert kinds.count(kind) == n
    for e in rec.events:
        assert set(e.attributes) == set(SCHEMAS[e.event_type]), e.event_type  # every documented field
        assert e.attributes["session_id"] == "abc"
    upd = [e.attributes for e in rec.events if e.event_type == "inference_update"]
    assert 0 < sum(u["generated_tokens"] for u in upd) <= 40
    hist = [u["tokens_ingested"] for u in upd]
    assert hist == sorted(hist) and hist[-1] <= s.num_tokens
    assert all(0 <= u["swap_rate"] <= 1 and 0 <= u["residency"] <= 1 for u in upd)
    fa = [e.attributes for e in rec.events if e.event_type == "focus_allocator"]
    assert all(0 < f["budget_used"] <= 1 for f in fa)


def test_clear_errors():
    model, modules, cfg = tiny_mc_model(seed=5)
    vanilla = GPT(GPTConfig(sequence_len=SEQ, vocab_size=256, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    with pytest.raises(MCSessionError, match=r"vanilla checkpoint.*--mc_enabled=1"):
        MCSession(vanilla)
    attach(vanilla, None, None)
    with pytest.raises(MCSessionError, match="--profile mc"):
        MCSession(vanilla)
    with pytest.raises(MCSessionError, match=r"exceeds the model's sequence_len=64"):
        MCSession(model, modules, cfg, W=65, refocus_interval=16)
    with pytest.raises(MCSessionError, match=r"W=30 - refocus_interval=24 = 6 must exceed"):
        MCSession(model, modules, cfg, W=30, refocus_interval=24)
    with pytest.raises(MCSessionError, match="recent_tokens"):
        MCSession(model, modules, cfg, W=8)
    with pytest.raises(MCSessionError, match="refocus_interval"):
        MCSession(model, modules, cfg, refocus_interval=0)
    s = MCSession(model, modules, cfg)
    with pytest.raises(ValueError, match="ingest at least one token"):
        s.next_logits()
    with pytest.raises(ValueError, match="vocab_size"):
        s.ingest([256])
    # a history whose most compressed covering no longer fits W: a ContextTooLongError naming the limits
    small = dataclasses.replace(cfg, max_lod=1, infer_max_lod=0)  # growth off
    s = MCSession(model, modules, small, W=20, refocus_interval=4)
    with pytest.raises(HistoryTooLongError, match=r"W=20 .*--mc_max_lod=1.*--mc_infer_max_lod=0") as e:
        s.ingest(list(range(200)))
    assert isinstance(e.value, ContextTooLongError)


def test_a_history_past_max_lod_grows_the_tree():
    """Block 8, max_lod 1, W 40 holds ~250 tokens; 3,000 tokens grow the tree to LOD3 (the same GistNet one
    level up, twice), entries stay <= W, the session's logits equal a from-scratch forward of its WC, and
    growth stops at --mc_infer_max_lod with the usual error."""
    model, modules, cfg = tiny_mc_model(max_lod=1, infer_max_lod=3)
    s = MCSession(model, modules, cfg, W=40, refocus_interval=4)
    ids = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    s.ingest(ids[:1500])
    s.ingest(ids[1500:])
    assert s.max_lod == s.cfg.max_lod == s.tree.max_lod == 3 and s.num_entries <= s.W
    lods = s.stats()["lod_histogram"]
    assert len(lods) == s.max_lod + 1 and lods[s.max_lod] > 0  # the new top level is in use
    bs = cfg.block_size
    top = s.tree.level(s.max_lod)
    assert top.size(1) == 3000 // bs ** s.max_lod  # every complete top-level unit has its gist
    torch.testing.assert_close(s.next_logits(), scratch_logits(s), atol=2e-5, rtol=1e-4)
    for _ in range(3):
        s.append_token(int(s.next_logits().argmax()))
        assert s.num_entries <= s.W
    capped = MCSession(model, modules, dataclasses.replace(cfg, infer_max_lod=2), W=40, refocus_interval=4)
    with pytest.raises(HistoryTooLongError, match="--mc_infer_max_lod=2"):
        capped.ingest(ids * 4)
