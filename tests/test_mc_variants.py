"""Variant sampler: property tests (tiling, alignment, budget, raw tail), baseline, dedup, determinism, anneal."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mc.train.variants import (
    annealed_wc_length,
    baseline_plan,
    hashed_uniform,
    priority_keys,
    sample_compressed_plans,
    sample_variants,
    unit_starts,
)
from mc.tree import min_variant_entries, unit_counts
from mc.working_context import build_working_context, check_invariants, check_plan, entry_counts


@st.composite
def setups(draw):
    bs = draw(st.sampled_from([2, 4, 8]))
    max_lod = draw(st.integers(1, 3))
    T = draw(st.integers(1, 700))
    R = draw(st.integers(0, T))
    e_min = min_variant_entries(T, bs, max_lod, R)
    W = draw(st.integers(max(e_min, R, 1), T + 20))
    return dict(B=draw(st.integers(1, 3)), T=T, W=W, num_variants=draw(st.integers(1, 4)), block_size=bs,
                max_lod=max_lod, recent_tokens=R, seed=draw(st.integers(0, 2**31)))


@settings(max_examples=150, deadline=None, database=None)
@given(setups())
def test_every_variant_is_a_legal_covering_within_budget(s):
    seed = s.pop("seed")
    T, W, R, bs, L = s["T"], s["W"], s["recent_tokens"], s["block_size"], s["max_lod"]
    vp = sample_variants(**s, generator=torch.Generator().manual_seed(seed))
    check_plan(vp.plan, bs, max_lod=L)
    counts = entry_counts(vp.plan, bs)
    base, comp = vp.is_baseline, ~vp.is_baseline
    assert base.sum() == s["B"] and (vp.sample_idx[base] == torch.arange(s["B"])).all()
    # baseline: exactly the last min(W, T) tokens, raw
    assert (vp.plan[base] == baseline_plan(T, W)).all()
    # compressed: whole history, last R raw, at most W entries, and the budget is used (no room for one more
    # expansion) unless everything is already raw
    p = vp.plan[comp]
    assert (p >= 0).all() and (p[:, T - R:] == 0).all()
    assert (counts[comp] <= W).all()
    assert ((counts[comp] > W - (bs - 1)) | (counts[comp] == T)).all()
    # the same through real working contexts: tiling, alignment, lod, length
    levels = [torch.zeros(s["B"], T, 1)] + [torch.zeros(s["B"], T // bs**lvl, 1) for lvl in range(1, L + 1)]
    wc = build_working_context(vp.plan, levels, bs, vp.sample_idx)
    check_invariants(_rows(wc, comp), T, bs, max_len=W, max_lod=L, full_cover=True)
    check_invariants(_rows(wc, base), T, bs, max_len=W, max_lod=0, full_cover=False)
    # no duplicate rows within a sample
    for b in range(s["B"]):
        rows = vp.plan[vp.sample_idx == b]
        assert len({tuple(r.tolist()) for r in rows}) == rows.size(0)


def _rows(wc, keep):
    from dataclasses import fields, replace
    return replace(wc, **{f.name: getattr(wc, f.name)[keep] for f in fields(wc)})


def test_coarsest_covering_counts():
    # T = 2048, R = 128, bs = 32: 60 blocks, 1 complete 1024-token group -> 1 + 28 + 128 entries
    assert unit_counts(2048, 32, 2, 128) == [60, 1]
    assert min_variant_entries(2048, 32, 2, 128) == 157
    assert min_variant_entries(2048, 32, 1, 128) == 188
    assert min_variant_entries(1000, 32, 2, 0) == 31 + 8  # no complete group, 31 blocks, 8-token partial block
    plan = sample_compressed_plans(3, 2048, 157, 32, 2, 128, torch.Generator().manual_seed(0))
    assert (plan[:, :1024] == 2).all() and (plan[:, 1024:1920] == 1).all() and (plan[:, 1920:] == 0).all()


def test_lod2_appears_only_with_a_full_super_block_and_mixes_levels():
    g = torch.Generator().manual_seed(0)
    short = sample_compressed_plans(50, 1024 + 127, 300, 32, 2, 128, g)
    assert (short != 2).all()  # 1024 + R tokens are needed for a complete LOD2 group
    plans = sample_compressed_plans(200, 4096, 600, 32, 2, 128, g)
    levels_used = {int(v) for v in plans.unique()}
    assert levels_used == {0, 1, 2}
    assert len({tuple(r.tolist()) for r in plans}) > 150  # variety


def test_deterministic_given_a_generator():
    kw = dict(B=4, T=3000, W=500, num_variants=6, block_size=32, max_lod=2, recent_tokens=64)
    a = sample_variants(**kw, generator=torch.Generator().manual_seed(7))
    b = sample_variants(**kw, generator=torch.Generator().manual_seed(7))
    c = sample_variants(**kw, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.plan, b.plan) and torch.equal(a.sample_idx, b.sample_idx)
    assert not torch.equal(a.plan, c.plan)


def test_dedup_drops_copies_of_the_baseline_when_nothing_needs_compressing():
    vp = sample_variants(B=2, T=100, W=100, num_variants=3, block_size=8, max_lod=2, recent_tokens=10)
    assert vp.plan.shape == (2, 100) and vp.is_baseline.all() and (vp.plan == 0).all()
    kept = sample_variants(B=2, T=100, W=100, num_variants=3, block_size=8, max_lod=2, recent_tokens=10, dedup=False)
    assert kept.plan.shape == (8, 100)


def test_budget_errors():
    with pytest.raises(ValueError, match="most compressed covering"):
        sample_variants(B=1, T=2048, W=150, num_variants=2, recent_tokens=128)
    with pytest.raises(ValueError, match="recent_tokens"):
        sample_variants(B=1, T=2048, W=100, num_variants=2, recent_tokens=128)


def test_anneal():
    T, target = 2048, 410
    start = round(0.8 * T)
    ws = [annealed_wc_length(s, 1000, 0.8, target, T) for s in range(0, 1201, 50)]
    assert ws[0] == start and ws[-1] == target and annealed_wc_length(1000, 1000, 0.8, target, T) == target
    assert all(a >= b for a, b in zip(ws, ws[1:]))
    assert annealed_wc_length(500, 1000, 0.8, target, T) == round((start + target) / 2)
    assert annealed_wc_length(0, 1000, 0.1, target, T) == target  # start already below the target
    assert annealed_wc_length(5, 0, 0.8, target, T) == target


def test_duplicate_weights_count_each_distinct_plan_once():
    from mc.train.variants import duplicate_weights
    a = torch.zeros(8, dtype=torch.int8)
    b = a.clone()
    b[:4] = 1
    plan = torch.stack([a, b, b, a, a, b])  # 2 samples × 3 rows: [a, b, b] and [a, a, b]
    w = duplicate_weights(plan, 3)
    assert w.tolist() == [1.0, 0.5, 0.5, 0.5, 0.5, 1.0]
    assert float(w.view(2, 3).sum(1)[0]) == 2.0  # two distinct plans in sample 0


def test_unit_starts_follow_the_keys_layout():
    # T = 100, bs 4, R 4: n1 = 24 blocks, n2 = 6 groups of 16 tokens; coarsest level first
    starts = unit_starts(100, 4, 2, 4)
    assert starts.tolist() == [16 * j for j in range(6)] + [4 * j for j in range(24)]


def test_priority_keys_with_equal_scores_keep_the_random_order():
    u = hashed_uniform(torch.arange(50), 3, 0, 1, 40)  # T = 130, bs 4, R 2: 32 blocks + 8 groups
    for s in (0.0, 0.7):
        k = priority_keys(u, torch.full((1, 40), s), 0.25)
        assert torch.equal(k.argsort(1), u.argsort(1))  # monotone in u: the same plans as the random variants
        assert torch.equal(sample_compressed_plans(50, 130, 60, 4, 2, 2, keys=k),
                           sample_compressed_plans(50, 130, 60, 4, 2, 2, keys=u))


def test_a_unit_lensnet_prefers_is_expanded_first_as_often_as_its_weight_says():
    """Weighted sampling without replacement: unit 3 (score 1, the others 0, temperature 0.25) expands first
    with probability e**4 / (e**4 + 13) = 0.81 among 14 units; a random variant picks it 1 time in 14."""
    n_units, rows = 14, 2000
    u = hashed_uniform(torch.arange(rows), 0, 7, 1, n_units)
    scores = torch.zeros(1, n_units)
    scores[0, 3] = 1.0
    first = priority_keys(u, scores, 0.25).argmin(1)
    assert 0.74 < float((first == 3).float().mean()) < 0.88
    assert 0.03 < float((u.argmin(1) == 3).float().mean()) < 0.12
    # and a child never expands before its parent (the keys stay a topological order)
    plans = sample_compressed_plans(rows, 4 * 16 + 8, 30, 4, 2, 8, keys=priority_keys(
        hashed_uniform(torch.arange(rows), 0, 7, 1, 20), torch.linspace(-1, 1, 20)[None], 0.25))
    check_plan(plans, 4, max_lod=2)
