"""Focus allocator: legality under random plans/scores, budget, raw tail, alignment, greedy order,
thresholds, hysteresis, stochastic_greedy seeding, score-map helpers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mc.allocator import allocate, entry_scores_to_token_map, token_map_to_entry_scores
from mc.config import MCConfig
from mc.train.variants import sample_compressed_plans
from mc.tree import min_variant_entries
from mc.working_context import check_plan, entry_counts, entry_starts


def cfg(**kw):
    return MCConfig(**kw)


@st.composite
def setups(draw):
    bs = draw(st.sampled_from([2, 4, 8]))
    max_lod = draw(st.integers(1, 3))
    T = draw(st.integers(2, 300))
    R = draw(st.integers(0, T // 2))
    e_min = min_variant_entries(T, bs, max_lod, R)
    W = draw(st.integers(max(e_min, 1), T + 5))
    W_plan = draw(st.integers(e_min, max(e_min, W + 3 * bs)))  # may exceed W: the hard fit must fix it
    rows = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    plan = sample_compressed_plans(rows, T, W_plan, bs, max_lod, R, generator=g)
    L = int(entry_counts(plan, bs).max())
    scores = torch.rand(rows, L, generator=g) * 2 - 1
    c = cfg(allocator_type=draw(st.sampled_from(["greedy", "stochastic_greedy"])),
            allocator_max_replacements=draw(st.integers(1, 10)), allocator_iterations=draw(st.integers(1, 3)),
            allocator_soft_max_length=draw(st.integers(0, T)),
            **dict(zip(("allocator_expand_threshold", "allocator_collapse_threshold"),
                       draw(st.sampled_from([(-0.3, -0.6), (0.0, -0.1), (0.1, -0.1), (0.5, -0.5)])))),
            allocator_sample_top_k=draw(st.integers(1, 5)))
    return plan, scores, W, c, bs, max_lod, R, seed


@settings(max_examples=120, deadline=None, database=None)
@given(setups())
def test_result_is_legal_within_budget_raw_tail_aligned(s):
    plan, scores, W, c, bs, max_lod, R, seed = s
    T = plan.size(1)
    new, state, stats = allocate(plan, scores, W, c, bs, max_lod, R, generator=torch.Generator().manual_seed(seed))
    check_plan(new, bs, max_lod=max_lod)
    assert (new >= 0).all()  # full coverage
    n = entry_counts(new, bs)
    assert (n <= W).all()
    assert (new[:, T - R:] == 0).all()
    assert torch.allclose(stats["budget_used"], n.float() / W)
    # every changed token lies in an aligned span that the state marks, and the state marks only edits
    changed = new != plan
    assert (state[changed] != 0).all()
    assert ((state > 0) <= (new <= plan)).all()  # expanded tokens got finer (or stayed, inside the edited span)
    # expands never push past the soft target unless the plan was already above it
    target = min(c.allocator_soft_max_length or W, W)
    n0 = entry_counts(plan, bs)
    grown = stats["expands"] > 0
    assert ((n <= torch.maximum(n0.clamp(max=W), torch.full_like(n, target))) | ~grown).all()
    # a second call with the returned state never reverses an edit of the first
    new2, _, _ = allocate(new, token_map_to_entry_scores(new, entry_scores_to_token_map(plan, scores, bs, max_lod),
                                                         bs, max_lod),
                          W, c, bs, max_lod, R, state=state, generator=torch.Generator().manual_seed(seed + 1),
                          align="left")
    check_plan(new2, bs, max_lod=max_lod)
    assert not ((state > 0) & (new2 > new)).any()  # just expanded -> not collapsed
    assert not ((state < 0) & (new2 < new)).any()  # just collapsed -> not expanded


def _gist_plan(n_gists, bs, raw_tail):
    """LOD1 gists over [0, n_gists*bs) then raw_tail raw tokens."""
    p = torch.zeros(1, n_gists * bs + raw_tail, dtype=torch.int8)
    p[:, : n_gists * bs] = 1
    return p


def test_greedy_all_positive_expands_highest_first():
    bs, n_g, tail = 4, 6, 4
    plan = _gist_plan(n_g, bs, tail)
    scores = torch.tensor([[0.2, 0.9, 0.3, 0.8, 0.5, 0.4] + [0.5] * tail])
    W = n_g + tail + 2 * (bs - 1)  # room for exactly two expands
    new, state, stats = allocate(plan, scores, W, cfg(allocator_max_replacements=8), bs, 1, tail)
    expanded = (new[0, : n_g * bs].view(n_g, bs) == 0).all(1)
    assert expanded.tolist() == [False, True, False, True, False, False]
    assert stats["expands"].item() == 2 and stats["collapses"].item() == 0
    # with a generous budget, max_replacements limits it to the top-k by score
    new, _, stats = allocate(plan, scores, 100, cfg(allocator_max_replacements=3), bs, 1, tail)
    expanded = (new[0, : n_g * bs].view(n_g, bs) == 0).all(1)
    assert expanded.tolist() == [False, True, False, True, True, False]


def test_all_negative_under_budget_changes_nothing():
    """A plan within W is never coarsened, however low its scores (a short chat stays the plain model)."""
    bs, T, R = 4, 40, 6
    mixed = torch.zeros(1, T, dtype=torch.int8)
    mixed[:, 8:16] = 1  # two LOD1 gists amid raw tokens
    for plan in (torch.zeros(2, T, dtype=torch.int8), mixed):
        L = int(entry_counts(plan, bs).max())
        scores = -torch.rand(plan.size(0), L, generator=torch.Generator().manual_seed(0)) * 0.5 - 0.5
        for c in (cfg(allocator_max_replacements=100, allocator_iterations=3),
                  cfg(allocator_type="stochastic_greedy", allocator_max_replacements=100)):
            W = int(entry_counts(plan, bs).max())  # exactly full: still no edit
            new, state, stats = allocate(plan, scores, W, c, bs, 2, R, generator=torch.Generator().manual_seed(0))
            assert torch.equal(new, plan) and (state == 0).all() and stats["iterations"] == 0
            assert (stats["collapses"] == 0).all() and (stats["forced"] == 0).all()


def test_all_negative_over_budget_collapses_only_to_fit_and_tail_stays_raw():
    bs, T, R, W = 4, 40, 6, 30
    plan = torch.zeros(2, T, dtype=torch.int8)
    scores = -torch.rand(2, T, generator=torch.Generator().manual_seed(0)) * 0.5 - 0.5
    new, _, stats = allocate(plan, scores, W, cfg(allocator_max_replacements=100), bs, 1, R)
    check_plan(new, bs, max_lod=1)
    # the hard fit takes the fewest collapses that fit W (ceil(10 / 3) = 4), the lowest-scored ones; the
    # remaining all-negative groups are not collapsed on their own
    assert (stats["forced"] == 4).all() and (stats["collapses"] == 0).all() and (stats["expands"] == 0).all()
    assert (entry_counts(new, bs) == T - 4 * (bs - 1)).all()
    assert (new[:, (T - R) // bs * bs:] == 0).all()
    group = scores[:, : (T - R) // bs * bs].reshape(2, -1, bs).mean(-1)
    collapsed = new[:, : (T - R) // bs * bs].reshape(2, -1, bs)[..., 0] == 1
    for r in range(2):
        assert set(group[r].argsort()[:4].tolist()) == set(collapsed[r].nonzero()[:, 0].tolist())


def test_scores_between_thresholds_make_no_edits():
    bs = 4
    plan = _gist_plan(4, bs, 8)
    plan[:, :4] = 0  # one expanded block (collapsible) + gists
    L = int(entry_counts(plan, bs).max())
    scores = torch.empty(1, L).uniform_(-0.09, 0.09)
    new, state, stats = allocate(plan, scores, 100, cfg(), bs, 1, 4)
    assert torch.equal(new, plan) and (state == 0).all() and stats["iterations"] == 0


def test_collapse_to_make_room_for_a_better_expand():
    bs = 4
    plan = _gist_plan(3, bs, 4)
    plan[:, :4] = 0  # block 0 raw (4 entries), blocks 1, 2 gists, 4 raw tail -> 10 entries
    scores = torch.tensor([[-0.8] * 4 + [0.9, 0.0] + [0.0] * 4])
    new, _, stats = allocate(plan, scores, 10, cfg(), bs, 1, 4)
    assert new[0, :4].tolist() == [1] * 4 and new[0, 4:8].tolist() == [0] * 4 and new[0, 8:12].tolist() == [1] * 4
    assert stats["expands"].item() == 1 and stats["collapses"].item() == 1
    assert entry_counts(new, bs).item() <= 10
    # with room for the expand, the low-scored raw block is left alone (no collapse without need)
    new, _, stats = allocate(plan, scores, 13, cfg(), bs, 1, 4)
    assert new[0, :8].tolist() == [0] * 8 and new[0, 8:12].tolist() == [1] * 4
    assert stats["expands"].item() == 1 and stats["collapses"].item() == 0
    # no room and max_replacements=1: the swap needs two edits, so neither is made
    new, _, stats = allocate(plan, scores, 10, cfg(allocator_max_replacements=1), bs, 1, 4)
    assert torch.equal(new, plan) and stats["collapses"].item() == 0


def test_make_room_below_a_soft_target_takes_several_collapses_or_none():
    bs = 4
    plan = _gist_plan(4, bs, 4)
    plan[:, :8] = 0  # blocks 0, 1 raw (8 entries), blocks 2, 3 gists, 4 raw tail -> 14 entries
    scores = torch.tensor([[-0.8] * 8 + [0.9, 0.0] + [0.0] * 4])
    # soft target 11 < 14 entries: the expand (+3) fits only after both raw blocks collapse (-6)
    new, _, stats = allocate(plan, scores, 14, cfg(allocator_soft_max_length=11), bs, 1, 4)
    assert new[0, :8].tolist() == [1] * 8 and new[0, 8:12].tolist() == [0] * 4
    assert stats["expands"].item() == 1 and stats["collapses"].item() == 2 and entry_counts(new, bs).item() == 11
    # soft target 8: three collapses would be needed and only two exist: nothing changes
    new, _, stats = allocate(plan, scores, 14, cfg(allocator_soft_max_length=8), bs, 1, 4)
    assert torch.equal(new, plan) and stats["collapses"].item() == 0


def test_hard_fit_when_history_outgrew_w():
    bs, T = 4, 64
    plan = torch.zeros(1, T, dtype=torch.int8)
    scores = torch.linspace(-1, 1, T)[None]
    new, _, stats = allocate(plan, scores, 20, cfg(), bs, 2, 4)
    check_plan(new, bs, max_lod=2)
    assert entry_counts(new, bs).item() <= 20 and stats["forced"].item() > 0
    with pytest.raises(ValueError, match="cannot be collapsed"):
        allocate(plan, scores, 5, cfg(), bs, 1, 4)


def test_hysteresis_blocks_immediate_reversal():
    bs = 4
    plan = _gist_plan(3, bs, 4)
    up = torch.tensor([[0.9, 0.9, 0.0] + [0.0] * 4])
    new, state, _ = allocate(plan, up, 100, cfg(), bs, 1, 4)
    assert (new[0, :8] == 0).all() and (new[0, 8:12] == 1).all()  # blocks 0, 1 expanded: 13 entries
    # now block 2 wants detail and there is no room: the only collapses that could make room are the
    # blocks just expanded, which the state protects
    down = torch.tensor([[-0.9] * 8 + [0.9] + [0.0] * 4])
    again, state2, stats = allocate(new, down, 13, cfg(), bs, 1, 4, state=state)
    assert torch.equal(again, new) and stats["collapses"].item() == 0 and stats["expands"].item() == 0
    third, _, stats = allocate(again, down, 13, cfg(), bs, 1, 4, state=state2)
    assert stats["collapses"].item() == 1 and stats["expands"].item() == 1  # one call later it may
    assert (third[0, 8:12] == 0).all()
    # and the other way round: a just-collapsed gist is not expanded
    undo, _, _ = allocate(third, torch.full((1, 13), 0.9), 100, cfg(), bs, 1, 4,
                          state=torch.full((1, 16), -1, dtype=torch.int8))
    assert torch.equal(undo, third)


def test_stochastic_greedy_varies_across_seeds_and_is_deterministic():
    bs, n_g, tail = 4, 12, 4
    plan = _gist_plan(n_g, bs, tail)
    scores = torch.cat([torch.linspace(0.5, 0.9, n_g), torch.zeros(tail)])[None]
    c = cfg(allocator_type="stochastic_greedy", allocator_sample_top_k=6, allocator_max_replacements=3)

    def run(seed):
        return allocate(plan, scores, 100, c, bs, 1, tail, generator=torch.Generator().manual_seed(seed))[0]

    outs = [run(s) for s in range(12)]
    assert len({tuple(o[0].tolist()) for o in outs}) > 1
    assert torch.equal(run(3), run(3))
    greedy = allocate(plan, scores, 100, cfg(allocator_max_replacements=3), bs, 1, tail)[0]
    assert (greedy[0, : n_g * bs].view(n_g, bs) == 0).all(1).tolist() == [False] * 9 + [True] * 3


def test_score_map_roundtrip_and_alignment():
    bs = 4
    plan = sample_compressed_plans(3, 50, 30, bs, 2, 5, generator=torch.Generator().manual_seed(1))
    L = int(entry_counts(plan, bs).max())
    left = token_map_to_entry_scores(plan, torch.arange(50.0).expand(3, 50), bs)
    tm = entry_scores_to_token_map(plan, left, bs, align="left")
    assert torch.equal(token_map_to_entry_scores(plan, tm, bs), left)
    starts = entry_starts(plan, bs)
    assert torch.equal(tm[starts], torch.arange(50.0).expand(3, 50)[starts])
    right = torch.zeros(3, L + 2)
    for r in range(3):
        n = int(starts[r].sum())
        right[r, L + 2 - n:] = left[r, :n]
    assert torch.equal(entry_scores_to_token_map(plan, right, bs), tm)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no -1"):
        allocate(torch.tensor([[-1, 0, 0, 0]], dtype=torch.int8), torch.zeros(1, 3), 4, cfg(), 2, 1, 0)
    with pytest.raises(ValueError, match="raw"):
        allocate(torch.ones(1, 4, dtype=torch.int8), torch.zeros(1, 2), 4, cfg(), 2, 1, 2)
