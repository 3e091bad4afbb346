"""
mc_eval's focus conditions and long-range tasks: MC-fixed / ORACLE / MC-LensNet plans under one
budget, a LensNet rigged to favour one block, passkey probes on histories longer than sequence_len
(and than the GPT's own rotary table), the straddling split, and the associative-recall generator.
"""

import numpy as np
import pytest
import torch

from mc.config import MCConfig
from mc.eval.conditions import covering_plan, fixed_focus_plan, oracle_plan, plan_entries, recency_focus, straddles
from mc.eval.data import EvalItem, probe_items
from mc.eval.report import straddle_split
from mc.eval.run import Setup, evaluate_batch, lensnet_plans
from mc.eval.tasks import ASSOC_QUERY, assoc_items, ledger_groups, ledger_text
from mc.gistnet import GistNet
from mc.lensnet import LensNet
from mc.tree import MegaContextTree
from mc.working_context import check_plan
from nanochat.gpt import GPT, GPTConfig
from tests.conftest import train_tiny_tokenizer

BS = 32


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer()


# ------------------------------------------------------------------ MC-fixed and ORACLE plans
def test_fixed_focus_spends_the_budget_on_the_most_recent_gists():
    T, W = 2048, 512  # cut 1536: one LOD2 unit [0, 1024), 16 LOD1 gists [1024, 1536), 512 raw
    base = covering_plan(T, W, BS, 2)
    n0 = plan_entries(base, BS)
    assert n0 == 1 + 16 + 512
    plan = fixed_focus_plan(T, W, 4 * 31, BS, 2)
    check_plan(plan[None], BS, max_lod=2)
    assert plan_entries(plan, BS) == n0 + 4 * 31
    assert (plan[1536 - 4 * 32:] == 0).all() and (plan[1024:1536 - 4 * 32] == 1).all() and (plan[:1024] == 2).all()
    # a budget that is not a multiple of bs - 1 is spent down to the last whole expansion
    assert plan_entries(fixed_focus_plan(T, W, 4 * 31 + 30, BS, 2), BS) == n0 + 4 * 31
    # once the LOD1 gists are raw, the latest gist left is the LOD2 unit: it opens into LOD1, newest first
    plan = fixed_focus_plan(T, W, 18 * 31, BS, 2)
    assert (plan[1024:] == 0).all() and (plan[1024 - 32:1024] == 0).all() and (plan[:1024 - 32] == 1).all()
    assert plan_entries(plan, BS) == n0 + 18 * 31
    # more budget than gists: everything raw, never past the cut (the window is raw anyway)
    assert (fixed_focus_plan(256, 128, 10_000, BS, 2) == 0).all()
    assert torch.equal(recency_focus(base, n0 + 30, 1536, BS), base)  # < one expansion: unchanged


def test_oracle_uses_the_same_budget_when_the_needles_fit():
    T, W, E = 2048, 512, 4 * 31
    base = covering_plan(T, W, BS, 2)
    n0 = plan_entries(base, BS)
    needle = [(100, 110)]  # inside the LOD2 unit: open it (31) + the block (31) = 62 <= E
    plan = oracle_plan(T, W, needle, BS, 2, budget_extra=E)
    check_plan(plan[None], BS, max_lod=2)
    assert (plan[96:128] == 0).all() and plan_entries(plan, BS) == n0 + E == plan_entries(fixed_focus_plan(T, W, E), BS)
    assert (plan[1536 - 64:1536] == 0).all() and (plan[1024:1536 - 64] == 1).all()  # the rest spent by recency
    # needles that cost more than E: all of them raw anyway, ORACLE reads more entries (reported)
    many = [(t, t + 5) for t in range(40, 1000, 100)]
    plan = oracle_plan(T, W, many, BS, 2, budget_extra=E)
    assert all((plan[a // BS * BS:(a // BS + 1) * BS] == 0).all() for a, _ in many)
    assert plan_entries(plan, BS) > n0 + E
    assert torch.equal(oracle_plan(T, W, needle, BS, 2), oracle_plan(T, W, needle, BS, 2, budget_extra=0))


def test_straddling_grouping_on_hand_made_items():
    assert not straddles(0, 4, 32) and not straddles(28, 4, 32) and straddles(29, 4, 32) and straddles(31, 2, 32)
    assert not straddles(32, 32, 32) and straddles(32, 33, 32) and not straddles(5, 0, 32)
    rows = []
    for a, n, hit in ((28, 4, True), (29, 4, False), (31, 2, False), (64, 3, True), (95, 1, True)):
        item = EvalItem([0] * 10, "probe", info={"straddle": straddles(a, n, 32)})
        rows.append((item, {"MC": [hit]}))
    split = straddle_split(rows, 50, 0)
    assert split["straddling"]["MC"]["value"] == 0.0 and split["straddling"]["MC"]["n_answers"] == 2
    assert split["not_straddling"]["MC"]["value"] == 1.0 and split["not_straddling"]["MC"]["n_answers"] == 3


# ------------------------------------------------------------------ MC-LensNet
def _rigged_lensnet(direction: torch.Tensor, bias: float) -> LensNet:
    """A LensNet whose score is tanh(k * x0 / rms(x)), x0 = u . norm(emb) - bias, x1 = 1: with its blocks
    the identity (zero output projections, as initialised) and a linear head reading x0. bias 4: only
    an entry whose embedding points along u scores + (u . norm(emb) = sqrt(C) = 8 there, ~N(0, 1) for
    random ones); bias -4: every entry scores +."""
    lens = LensNet(64, layers=1, n_head=4, head="linear", max_lod=2)
    with torch.no_grad():
        for p in lens.parameters():
            p.zero_()
        lens.in_proj.weight[0] = direction
        lens.feat_proj.weight[0, 2] = -bias
        lens.feat_proj.weight[1, 2] = 1.0
        lens.head_out.weight[0, 0] = 4.0 * lens.d_model  # the readout is divided by its fan-in
    return lens.eval()


def _levels(R, T, marked_block=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lod0 = torch.randn(R, T, 64, generator=g)
    levels = MegaContextTree.build(lod0, GistNet(64, BS, gistnet_type="mean"), BS, 2).levels
    u = torch.zeros(64)
    u[3] = 1.0
    if marked_block is not None:
        levels[1][:, marked_block] = 10 * u
    return levels, u


def _focus_setup(lensnet, W, E=4 * 31, iterations=2):
    model = GPT(GPTConfig(sequence_len=128, vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    mean = GistNet(64, BS, gistnet_type="mean")
    return Setup(model, mean, mean, W, W, BS, 2, "gaussian", 8, focus_budget=E, lensnet=lensnet,
                 focus_cfg=MCConfig(allocator_iterations=iterations), generator=torch.Generator().manual_seed(0))


def test_lensnet_favouring_one_block_expands_that_block():
    T, W = 1024 + 256, 32  # cut 1248: LOD2 [0, 1024), 7 LOD1 gists [1024, 1248), 32 raw
    levels, u = _levels(2, T, marked_block=33)  # block [1056, 1088)
    setup = _focus_setup(_rigged_lensnet(u, bias=4.0), W)
    plans, stats = lensnet_plans(setup, [EvalItem([], 'text')] * 2, T, levels)
    base = covering_plan(T, W, BS, 2)
    check_plan(plans, BS, max_lod=2)
    for r in range(2):
        expect = base.clone()
        expect[1056:1088] = 0
        assert torch.equal(plans[r], expect)  # that block raw, nothing else changed
        assert stats[r]["changed"] and stats[r]["expands"] == 1 and stats[r]["score_max"] > 0.9
    # the same LensNet with the LOD2 unit marked instead: one refocus of 2 iterations opens it
    levels, _ = _levels(1, T)
    levels[2][:, 0] = 10 * u
    plans, _ = lensnet_plans(setup, [EvalItem([], 'text')] * 1, T, levels)
    assert (plans[0, :1024] < 2).all() and (plans[0, 1024:] == base[1024:]).all()
    assert lensnet_plans(_focus_setup(None, W), T, 1, levels) is None  # no LensNet: not available


def test_fixed_and_lensnet_plans_share_the_budget_and_keep_the_window_raw():
    T, W, E = 1024 + 256, 64, 4 * 31
    levels, u = _levels(3, T)
    levels[1][:, 32:36] = 10 * u  # four LOD1 gists want detail, the rest do not (scores are row-centred)
    setup = _focus_setup(_rigged_lensnet(u, bias=4.0), W, E)
    plans, stats = lensnet_plans(setup, [EvalItem([], 'text')] * 3, T, levels)
    fixed = fixed_focus_plan(T, W, E, BS, 2)
    base = covering_plan(T, W, BS, 2)
    check_plan(torch.cat([plans, fixed[None]]), BS, max_lod=2)
    for r in range(3):
        assert plan_entries(plans[r], BS) == plan_entries(fixed, BS) == plan_entries(base, BS) + E
        assert (plans[r, T - W:] == 0).all() and (fixed[T - W:] == 0).all()
        assert not torch.equal(plans[r], fixed)  # same budget, different places: LensNet is not recency
    # through the evaluator: entries per condition per item, all focus conditions at covering + E
    model = setup.model
    model.init_weights()
    setup.gistnet = setup.meanpool
    g = torch.Generator().manual_seed(1)
    items = [EvalItem(torch.randint(0, 500, (T + 1,), generator=g).tolist(), "text") for _ in range(2)]
    res, meta, _ = evaluate_batch(setup, items)
    for m in meta:
        e = m["entries"]
        assert "FULL" not in e and e["RECENCY"] == W and e["MC"] == plan_entries(base, BS)
        assert e["MC-fixed"] == e["ORACLE"] == e["MC"] + E  # no needles: ORACLE = MC-fixed
        # MC-LensNet spends at most the same budget, one block (bs - 1 entries) per expansion
        assert e["MC-LensNet"] == e["MC"] + (BS - 1) * m["lens"]["expands"] <= e["MC"] + E
    assert all(len(r["MC-LensNet"][0]) == W for r in res)


# ------------------------------------------------------------------ long histories
def test_passkey_at_16x_w_runs_past_sequence_len_and_the_rotary_table(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=64))
    model.init_weights()
    W = 32
    T = 16 * W  # 512 tokens: 16x sequence_len, past the GPT's own rotary table (10 x 32 = 320 positions)
    assert T > model.rotary_len
    items = probe_items(tok, 4, T, W, BS)
    assert [it.info["straddle"] for it in items] == [False, False, True, True]
    assert [it.info["fact"] for it in items] == ["passkey", "kv", "passkey", "kv"]
    for it in items:
        a, u1 = it.info["value_token"], it.answers[0].span[1]
        assert straddles(a, it.answers[0].source_end - a, BS) == it.info["straddle"]
        assert it.answers[0].long_range and u1 == T + 1
    mean = GistNet(64, BS, gistnet_type="mean")
    setup = Setup(model.eval(), mean, mean, W, W, BS, 2, "gaussian", 4, focus_budget=62)
    res, meta, _ = evaluate_batch(setup, items)
    for r, m in zip(res, meta):
        assert "FULL" not in r and {"RECENCY", "MC", "MC-fixed", "ORACLE"} <= set(r)
        assert all(np.isfinite(r[c][0]).all() and len(r[c][0]) == W for c in r)
        assert max(m["entries"].values()) <= model.config.sequence_len * 10  # every WC stays small
        assert m["entries"]["MC-fixed"] == m["entries"]["MC"] + 62


# ------------------------------------------------------------------ associative recall data
def test_ledger_text_spans():
    assert ledger_groups(8) == [4, 4] and ledger_groups(6) == [6] and ledger_groups(13) == [5, 4, 4]
    text, pairs, values = ledger_text(["harbour", "mill"], ["oak", "zinc", "wren"], ["412", "9051", "77"])
    assert text == " The harbour ledger reads: oak=412, zinc=9051, wren=77."
    assert [text[a:b] for a, b in pairs] == ["oak=412", "zinc=9051", "wren=77"]
    assert [text[a:b] for a, b in values] == ["412", "9051", "77"]


def test_assoc_items_place_pairs_before_the_cut_and_queries_in_the_window(tok):
    piece_bytes = tok.token_bytes().numpy()
    T, W, K, Q = 512, 128, 8, 4
    items = assoc_items(tok, piece_bytes, 2, T, W, BS, pairs=K, queries=Q)
    assert len(items) == 2 * Q
    for it in items:
        assert len(it.ids) == T + 1 and it.ids[0] == tok.get_bos_token_id() and it.kind == "assoc"
        (ans,) = it.answers
        info = it.info
        u0, u1 = ans.span
        assert u1 == T + 1 and tok.decode(it.ids[u0:u1]) == info["value"] + "."  # value + ".", at the very end
        v0 = info["value_token"]
        assert tok.decode(it.ids[v0:ans.source_end]).strip() == info["value"]  # the stated value's tokens
        (needle,) = it.needles
        assert tok.decode(it.ids[needle[0]:needle[1]]).strip() == f"{info['key']}={info['value']}"
        assert needle[1] <= T - W and ans.long_range  # the pair lies before the cut
        query = tok.encode(ASSOC_QUERY.format(key=info["key"]))
        q0 = u0 - len(query)
        assert it.ids[q0:u0] == query and q0 >= T - W  # the question sits in the raw window
        assert info["straddle"] == straddles(v0, ans.source_end - v0, BS)
        text = tok.decode(it.ids)
        assert text.count(f"{info['key']}=") == 1 and "ledger reads: " in text
        assert text.count(f"What is {info['key']}'s value?") == 1  # asked once per sequence
    # one sequence: the same pairs, a new question per item, the earlier questions answered before it
    seq = items[:Q]
    assert len({it.info["key"] for it in seq}) == Q and [it.info["query"] for it in seq] == list(range(Q))
    last = tok.decode(seq[-1].ids)
    for it in seq[:-1]:
        assert f"What is {it.info['key']}'s value? {it.info['value']}." in last
    # values are distinct, keys never occur in the haystack outside the ledger
    values = [it.info["value"] for it in seq]
    assert len(set(values)) == Q
    with pytest.raises(ValueError, match="assoc_queries"):
        assoc_items(tok, piece_bytes, 1, T, W, BS, pairs=4, queries=5)
    with pytest.raises(ValueError, match="raw window"):
        assoc_items(tok, piece_bytes, 1, T, 32, BS, pairs=8, queries=6)
