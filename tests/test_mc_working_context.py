"""Working context: plans -> entries, embeddings, targets that line up exactly, invariants."""

import pytest
import torch

from mc.working_context import (
    build_working_context,
    check_invariants,
    check_plan,
    entry_counts,
    entry_starts,
    plan_from_wc,
    targets_for,
)

BS, C = 4, 8


def _levels(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, C, generator=g), torch.randn(B, T // BS, C, generator=g),
            torch.randn(B, T // BS**2, C, generator=g)]


def _hand_plan():
    """T = 42: [0,16) LOD2 | [16,20) LOD1 | [20,24) raw | [24,32) 2x LOD1 | [32,42) raw (last block partial)."""
    p = torch.zeros(42, dtype=torch.int8)
    p[:16] = 2
    p[16:20] = 1
    p[24:32] = 1
    return p


def test_entries_from_a_hand_plan():
    plan = _hand_plan()[None]
    levels = _levels(1, 42)
    wc = build_working_context(plan, levels, BS)
    assert wc.lod[0].tolist() == [2, 1, 0, 0, 0, 0, 1, 1] + [0] * 10
    assert wc.span_start[0].tolist() == [0, 16, 20, 21, 22, 23, 24, 28] + list(range(32, 42))
    assert wc.span_len[0].tolist() == [16, 4, 1, 1, 1, 1, 4, 4] + [1] * 10
    assert wc.positions[0].tolist() == [15, 19, 20, 21, 22, 23, 27, 31] + list(range(32, 42))
    assert wc.valid.all() and entry_counts(plan, BS).tolist() == [18]
    e = wc.embeddings[0]
    torch.testing.assert_close(e[0], levels[2][0, 0])
    torch.testing.assert_close(e[1], levels[1][0, 4])
    torch.testing.assert_close(e[2], levels[0][0, 20])
    torch.testing.assert_close(e[7], levels[1][0, 7])
    torch.testing.assert_close(e[-1], levels[0][0, 41])
    check_invariants(wc, 42, BS, max_len=18, max_lod=2)


def test_targets_line_up_with_the_token_after_each_span():
    plan = _hand_plan()[None]
    x = torch.arange(100, 143)[None]  # 43 tokens: the 42 of the history + the next one
    wc = build_working_context(plan, _levels(1, 42), BS)
    tgt = targets_for(wc, x)[0]
    assert tgt.tolist() == [x[0, s + n].item() for s, n in zip(wc.span_start[0].tolist(), wc.span_len[0].tolist())]
    assert tgt[0] == 116 and tgt[1] == 120 and tgt[2] == 121 and tgt[-1] == 142  # gist [0,16) -> x[16]
    assert targets_for(wc, x[:, :42])[0, -1] == -1  # without the extra token the newest entry has none


def test_all_raw_targets_are_the_language_model_targets():
    B, T = 3, 20
    row = torch.randint(0, 50, (B, T + 1))  # x = row[:, :-1], y = row[:, 1:]
    y = row[:, 1:]
    plan = torch.zeros(B, T, dtype=torch.int8)
    wc = build_working_context(plan, [torch.randn(B, T, C)], BS)
    assert torch.equal(targets_for(wc, row), y)
    assert torch.equal(wc.positions, torch.arange(T).float().expand(B, T))


def test_padding_alignment_and_sample_index():
    levels = _levels(2, 40)
    full = torch.zeros(40, dtype=torch.int8)
    short = torch.zeros(40, dtype=torch.int8)
    short[:16] = 2
    short[16:32] = 1  # 1 + 4 + 8 = 13 entries
    recency = torch.zeros(40, dtype=torch.int8)
    recency[:30] = -1  # baseline: last 10 raw, start not block-aligned
    plan = torch.stack([full, short, recency])
    sample_idx = torch.tensor([0, 1, 1])
    wc = build_working_context(plan, levels, BS, sample_idx)
    assert wc.lengths.tolist() == [40, 13, 10]
    assert wc.valid[1, :27].sum() == 0 and wc.valid[1, 27:].all()  # right-aligned: padding first
    assert wc.lod[1, 0] == -1 and wc.span_len[1, 0] == 0 and wc.embeddings[1, :27].abs().sum() == 0
    torch.testing.assert_close(wc.embeddings[1, 27], levels[2][1, 0])  # sample 1's LOD2 gist
    torch.testing.assert_close(wc.embeddings[2, -10], levels[0][1, 30])
    check_invariants(wc, 40, BS, max_len=40, max_lod=2, full_cover=False)
    left = build_working_context(plan, levels, BS, sample_idx, align="left", length=45)
    assert left.valid.shape == (3, 45) and left.valid[1, :13].all() and not left.valid[1, 13:].any()
    torch.testing.assert_close(left.embeddings[1, :13], wc.embeddings[1, 27:])
    assert torch.equal(plan_from_wc(wc, 40), plan) and torch.equal(plan_from_wc(left, 40), plan)
    with pytest.raises(ValueError, match="length=20"):
        build_working_context(plan, levels, BS, sample_idx, length=20)


def test_invariant_checker_catches_broken_contexts():
    plan = torch.stack([_hand_plan(), torch.zeros(42, dtype=torch.int8)])
    wc = build_working_context(plan, _levels(2, 42), BS)
    check_invariants(wc, 42, BS, max_len=42, max_lod=2)

    def broken(field, r, i, value):
        w = build_working_context(plan, _levels(2, 42), BS)
        getattr(w, field)[r, i] = value
        return w

    with pytest.raises(ValueError, match="max_len"):
        check_invariants(wc, 42, BS, max_len=30)
    with pytest.raises(ValueError, match="lod outside"):
        check_invariants(wc, 42, BS, max_lod=1)
    with pytest.raises(ValueError, match="gap"):
        check_invariants(broken("span_start", 1, 30, 31), 42, BS)
    with pytest.raises(ValueError, match="span_len"):
        check_invariants(broken("span_len", 0, 25, 2), 42, BS)
    with pytest.raises(ValueError, match="aligned"):
        w = broken("span_start", 0, 30, 33)
        w.lod[0, 30], w.span_len[0, 30] = 1, 4
        check_invariants(w, 42, BS)
    with pytest.raises(ValueError, match="contiguous"):
        check_invariants(broken("valid", 1, 10, False), 42, BS)
    with pytest.raises(ValueError, match="start at token 0"):
        check_invariants(broken("valid", 1, 0, False), 42, BS)
    with pytest.raises(ValueError, match="end at 43"):
        check_invariants(wc, 43, BS)


@pytest.mark.parametrize("bad, match", [
    ([0, -1, 0, 0, 0, 0, 0, 0], "prefix"),
    ([1, 1, 1, 0, 0, 0, 0, 0], "whole aligned spans"),
    ([0, 1, 1, 1, 1, 0, 0, 0], "whole aligned spans"),
    ([0, 0, 0, 0, 0, 0, 0, 3], r"\[-1, 2\]"),
])
def test_illegal_plans_are_rejected(bad, match):
    plan = torch.tensor([bad], dtype=torch.int8)
    with pytest.raises(ValueError, match=match):
        check_plan(plan, BS, max_lod=2)
    with pytest.raises(ValueError, match=match):
        build_working_context(plan, _levels(1, 8), BS)


def test_missing_lod0_is_a_clear_error_and_gists_work_without_it():
    levels = _levels(1, 32)
    gists_only = torch.ones(1, 32, dtype=torch.int8)
    wc = build_working_context(gists_only, [None, levels[1], None], BS)
    torch.testing.assert_close(wc.embeddings[0], levels[1][0])
    with pytest.raises(ValueError, match="mc_cache_lod0"):
        build_working_context(torch.zeros(1, 32, dtype=torch.int8), [None, levels[1]], BS)


def test_gradients_and_dtype():
    lod0 = torch.randn(1, 16, C, dtype=torch.bfloat16, requires_grad=True)
    lod1 = torch.randn(1, 4, C, requires_grad=True)
    plan = torch.tensor([[1] * 8 + [0] * 8], dtype=torch.int8)
    wc = build_working_context(plan, [lod0, lod1], BS)
    assert wc.embeddings.dtype == torch.float32
    wc.embeddings.sum().backward()
    assert lod0.grad[0, 8:].abs().sum() > 0 and lod0.grad[0, :8].abs().sum() == 0
    assert lod1.grad[0, :2].abs().sum() > 0 and lod1.grad[0, 2:].abs().sum() == 0


def test_entry_starts_equals_the_modulo_definition():
    """entry_starts reads strided views per level; it must equal the definition (level >= 0 and the token
    at a multiple of bs**level) on legal plans of every shape, with a -1 prefix and an explicit max_level."""
    from mc.train.variants import sample_compressed_plans

    g = torch.Generator().manual_seed(0)
    for T, bs, L in ((2048, 32, 2), (1000, 8, 3), (777, 4, 2), (64, 2, 5)):
        plans = sample_compressed_plans(16, T, max(T // 3, 60), bs, L, 8, generator=g)
        plans[:4, :bs ** L] = -1  # not in the WC (a prefix of whole top-level spans)
        lvl = plans.long()
        t = torch.arange(T)
        want = (lvl >= 0) & (t % (bs ** lvl.clamp(min=0)) == 0)
        for max_level in (None, L):
            assert torch.equal(entry_starts(plans, bs, max_level), want), (T, bs, L)
