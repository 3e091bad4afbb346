"""The entry-list allocator (mc/entry_allocator.py) against the per-token one (mc/allocator.py): same plan,
same hysteresis, same stats on random legal plans, scores and knobs; the span scores and the mark/state
conversion on their own."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mc.allocator import PlanDoesNotFitError, allocate, entry_scores_to_token_map
from mc.config import MCConfig
from mc.entry_allocator import SpanScores, allocate_entries, marks_from_state, state_from_marks
from mc.train.variants import sample_compressed_plans
from mc.tree import min_variant_entries
from mc.working_context import check_plan, entry_starts


def to_entries(plan, bs, max_lod):
    start = entry_starts(plan, bs, max_level=max_lod)[0].nonzero()[:, 0]
    return start, plan[0, start].long()


def to_plan(start, lod, bs):
    return lod.repeat_interleave(bs ** lod).to(torch.int8)[None]


@st.composite
def setups(draw):
    bs = draw(st.sampled_from([2, 4, 8]))
    max_lod = draw(st.integers(1, 3))
    T = draw(st.integers(2, 400))
    R = draw(st.integers(0, T // 2))
    e_min = min_variant_entries(T, bs, max_lod, R)
    W = draw(st.integers(max(e_min, 1), T + 5))
    W_plan = draw(st.integers(e_min, max(e_min, W + 3 * bs)))  # may exceed W: the hard fit must fix it
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    plan = sample_compressed_plans(1, T, W_plan, bs, max_lod, R, generator=g)
    L = int(entry_starts(plan, bs).sum())
    # dyadic scores (k / 64): every mean and max is exact in both allocators, so ties break alike
    scores = torch.randint(-64, 65, (1, L), generator=g).float() / 64
    c = MCConfig(allocator_type=draw(st.sampled_from(["greedy", "stochastic_greedy"])),
                 allocator_max_replacements=draw(st.integers(1, 10)), allocator_iterations=draw(st.integers(1, 3)),
                 allocator_soft_max_length=draw(st.integers(0, T)),
                 **dict(zip(("allocator_expand_threshold", "allocator_collapse_threshold"),
                            draw(st.sampled_from([(-0.3, -0.6), (0.0, -0.1), (0.1, -0.1), (0.5, -0.5)])))),
                 allocator_sample_top_k=draw(st.integers(1, 5)))
    return plan, scores, W, c, bs, max_lod, R, seed, draw(st.booleans())


def both(plan, scores, W, c, bs, max_lod, R, seed, best_first, state=None):
    """(per-token result, entry-list result as a plan/state) of one call on the same input."""
    T = plan.size(1)
    try:
        ref = allocate(plan, scores, W, c, bs, max_lod, R, state=state, generator=torch.Generator().manual_seed(seed),
                       best_first=best_first)
    except PlanDoesNotFitError:
        ref = None
    start, lod = to_entries(plan, bs, max_lod)
    spans = SpanScores.of_entries(start, lod, scores[0], bs)
    try:
        s2, l2, marks, _, stats = allocate_entries(start, lod, spans, W, c, bs, max_lod, max(T - R, 0),
                                                   marks_from_state(state), torch.Generator().manual_seed(seed),
                                                   best_first=best_first)
    except PlanDoesNotFitError:
        return ref, None
    return ref, (to_plan(s2, l2, bs), state_from_marks(marks, T), stats)


@settings(max_examples=150, deadline=None, database=None)
@given(setups())
def test_the_entry_list_allocator_makes_the_per_token_allocators_edits(s):
    plan, scores, W, c, bs, max_lod, R, seed, best_first = s
    ref, got = both(plan, scores, W, c, bs, max_lod, R, seed, best_first)
    assert (ref is None) == (got is None)
    if ref is None:
        return
    check_plan(got[0], bs, max_lod=max_lod)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    for k in ("expands", "collapses", "forced"):
        assert torch.equal(got[2][k], ref[2][k]), k
    assert got[2]["iterations"] == ref[2]["iterations"]
    assert torch.allclose(got[2]["budget_used"], ref[2]["budget_used"])
    # a second call on the new plan, with the first call's hysteresis: still the same
    L = int(entry_starts(ref[0], bs).sum())
    again = torch.randint(-64, 65, (1, L), generator=torch.Generator().manual_seed(seed + 1)).float() / 64
    ref2, got2 = both(ref[0], again, W, c, bs, max_lod, R, seed + 1, best_first, state=ref[1])
    assert torch.equal(got2[0], ref2[0]) and torch.equal(got2[1], ref2[1])


def test_span_scores_equal_the_token_maps_mean_and_max():
    g = torch.Generator().manual_seed(0)
    bs, max_lod = 4, 3
    for _ in range(20):
        plan = sample_compressed_plans(1, 500, 120, bs, max_lod, 20, generator=g)
        start, lod = to_entries(plan, bs, max_lod)
        scores = torch.rand(start.numel(), generator=g) * 2 - 1
        token_map = entry_scores_to_token_map(plan, scores[None], bs, max_lod)[0]
        spans = SpanScores.of_entries(start, lod, scores, bs)
        for level in range(max_lod + 1):  # every aligned node of every level
            span = bs ** level
            qs = torch.arange(0, 500 // span * span, span)
            mean, best = spans(qs, qs + span)
            units = token_map[: qs.numel() * span].view(-1, span)
            assert torch.allclose(mean, units.mean(1), atol=1e-6) and torch.equal(best, units.amax(1))


def test_marks_and_state_convert_both_ways():
    state = torch.tensor([[0, 1, 1, -1, -1, 0, 0, 1, -1, 0]], dtype=torch.int8)
    marks = marks_from_state(state)
    assert marks.tolist() == [[1, 3, 1], [3, 5, -1], [7, 8, 1], [8, 9, -1]]
    assert torch.equal(state_from_marks(marks, 10), state)
    assert marks_from_state(None) is None and state_from_marks(None, 5) is None
    assert marks_from_state(torch.zeros(1, 0, dtype=torch.int8)).shape == (0, 3)


def test_a_gist_in_the_raw_tail_is_refused():
    start, lod = torch.tensor([0, 4, 5, 6, 7]), torch.tensor([1, 0, 0, 0, 0])
    spans = SpanScores.of_entries(start, lod, torch.zeros(5), 4)
    with pytest.raises(ValueError, match="must be raw"):
        allocate_entries(start, lod, spans, 8, MCConfig(), 4, 1, limit=2)
