"""LensNet and its preference loss: shapes, padding, gradients, pairs, and a planted problem it must solve."""

import math

import pytest
import torch

from mc.lensnet import LensNet
from mc.train.lens_loss import (
    AdvantageNormalizer,
    BudgetSmoother,
    bradley_terry_loss,
    candidate_mask,
    hard_negative_filter,
    lens_preference_loss,
    policy_kl,
    policy_scores,
    preference_pairs,
)
from mc.train.variants import sample_variants
from mc.working_context import WorkingContext, build_working_context

C, BS, T, RECENT = 32, 8, 128, 16  # 16 blocks of 8 tokens; the last 16 tokens stay raw
P = (T - RECENT) // BS * BS  # compressible prefix: 14 blocks
STEPS = 400
# The planted marker's norm against a gist's noise (norm ~2: the mean of 8 unit-variance 32-d tokens). At
# norm 1 the task sat in the middle of the outcome distribution (hit 0.34 on one CPU, 0.83 on another; 5
# of 10 seed pairs passed); at 4 the marker block is plainly visible, which is what this test is about:
# does the preference loss teach LensNet to rank the block whose compression costs most.
MARKER_NORM = 4.0


def _perturb(net, scale=0.1):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def _history(B, g, marker=None):
    """Token embeddings [B, T, C] and LOD1 gists (block means); block `marker[b]` carries the marker vector."""
    lod0 = torch.randn(B, T, C, generator=g)
    if marker is not None:
        mvec = torch.randn(C, generator=torch.Generator().manual_seed(123))
        mvec = MARKER_NORM * mvec / mvec.norm()  # a gist's noise has norm ~2
        for b in range(B):
            m = int(marker[b])
            lod0[b, m * BS:(m + 1) * BS] += mvec
    lod1 = lod0.view(B, T // BS, BS, C).mean(2)
    return [lod0, lod1]


def _wc(B, N, W, g, marker=None, length=None, align="right"):
    vp = sample_variants(B, T, W, N, block_size=BS, max_lod=1, recent_tokens=RECENT, generator=g, dedup=False)
    levels = _history(B, g, marker)
    wc = build_working_context(vp.plan, levels, BS, vp.sample_idx, length=length, align=align)
    return vp.plan, wc


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_shapes_range_and_zero_init(head):
    g = torch.Generator().manual_seed(0)
    _, wc = _wc(3, 4, 58, g)
    net = LensNet(C, layers=2, n_head=4, head=head, d_model=32)
    s = net(wc)
    assert s.shape == wc.valid.shape
    assert torch.equal(s, torch.zeros_like(s))  # no opinion at init
    torch.manual_seed(1)
    _perturb(net, 1.0)
    s = net(wc)
    assert s.abs().max() <= 1.0 and s.abs().max() > 0
    assert torch.equal(s[~wc.valid], torch.zeros_like(s[~wc.valid]))
    s2 = net(embeddings=wc.embeddings, lod=wc.lod, span_start=wc.span_start, span_len=wc.span_len, valid=wc.valid)
    torch.testing.assert_close(s, s2)
    mats, vecs = net.matrix_params(), net.vector_params()
    assert len(mats) + len(vecs) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="embeddings"):
        net(embeddings=torch.zeros(2, 3, C + 1), lod=wc.lod, span_start=wc.span_start, span_len=wc.span_len,
            valid=wc.valid)


def test_padding_and_alignment_do_not_affect_valid_scores():
    g = torch.Generator().manual_seed(2)
    plan, wc = _wc(2, 3, 58, g)
    L = wc.valid.size(1)
    g2 = torch.Generator().manual_seed(2)
    _, wc_left = _wc(2, 3, 58, g2, length=L + 5, align="left")
    torch.manual_seed(3)
    net = _perturb(LensNet(C, layers=2, d_model=32), 0.5)
    a = net(wc)
    # garbage in the padding of the longer, left-aligned copy
    wl = WorkingContext(**{k: getattr(wc_left, k).clone() for k in wc_left.__dataclass_fields__})
    pad = ~wl.valid
    wl.embeddings[pad] = 1e3 * torch.randn_like(wl.embeddings[pad])
    wl.lod[pad], wl.span_start[pad], wl.span_len[pad] = 1, 10_000, 7
    b = net(wl)
    assert torch.equal(b[pad], torch.zeros_like(b[pad]))
    for r in range(a.size(0)):
        torch.testing.assert_close(a[r][wc.valid[r]], b[r][wl.valid[r]], rtol=1e-5, atol=1e-5)


def test_lens_loss_has_gradient_into_lensnet_and_metrics_are_tensors():
    g = torch.Generator().manual_seed(4)
    B, N = 3, 5
    _, wc = _wc(B, N, 58, g)
    net = LensNet(C, layers=2, d_model=32)
    h = torch.rand(B, 1 + N, generator=g) + 2.0
    out = lens_preference_loss(net(wc), wc, h, temperature=0.5, block_size=BS, history_len=T)
    out.loss.backward()
    assert net.head_out.weight.grad is not None and net.head_out.weight.grad.abs().sum() > 0  # zero init: head first
    torch.manual_seed(5)
    _perturb(net)
    net.zero_grad()
    out = lens_preference_loss(net(wc), wc, h, temperature=0.5, kl_weight=0.1, budget_smoother=BudgetSmoother(0.9),
                               budget_weight=0.1, adv_normalizer=AdvantageNormalizer(0.99), block_size=BS, history_len=T)
    out.loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for k in ("mc/lens_loss", "mc/preference_corr_mean", "mc/preference_corr_max", "mc/pref_span_corr",
              "mc/policy_score_abs_mean", "mc/policy_score_std_mean", "mc/lens_pairs"):
        v = out.metrics[k]
        assert torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad, k
        assert torch.isfinite(v), k


def test_pairs_hard_negatives_and_bradley_terry_by_hand():
    h = torch.tensor([[5.0, 6.0, 8.0, 7.0]])  # ΔNLL = [0, 1, 3, 2]
    delta = h - h[:, :1]
    cand = candidate_mask(1, 4, h.device)
    assert cand.tolist() == [[False, True, True, True]]
    pairs, gap = preference_pairs(delta, cand)
    got = {(i, j): float(gap[0, i, j]) for i, j in pairs[0].nonzero().tolist()}
    assert got == {(1, 2): 2.0, (1, 3): 1.0, (3, 2): 1.0}  # (i better, j worse): gap
    keep = hard_negative_filter(pairs, gap, 0.3)  # ceil(0.9) = 1 pair: the biggest gap
    assert keep[0].nonzero().tolist() == [[1, 2]]
    keep = hard_negative_filter(pairs, gap, 0.5)  # ceil(1.5) = 2 pairs
    assert keep.sum() == 2 and keep[0, 1, 2]
    assert torch.equal(hard_negative_filter(pairs, gap, 1.0), pairs)
    s = torch.tensor([[0.0, 0.5, -0.2, 0.1]])
    tau = 0.5
    want = sum(-math.log(1 / (1 + math.exp(-(s[0, i] - s[0, j]) / tau))) for i, j in [(1, 2), (1, 3), (3, 2)]) / 3
    torch.testing.assert_close(bradley_terry_loss(s, pairs, tau), torch.tensor(want))
    # with the baseline as a candidate: it (ΔNLL 0) beats every variant
    pairs_b, _ = preference_pairs(delta, candidate_mask(1, 4, h.device, include_baseline=True))
    assert pairs_b.sum() == 6 and pairs_b[0, 0, 1:].all()


def test_policy_score_by_hand():
    # one sample, two hand-made rows (spans need not form a legal plan for this reduction)
    # entries: lod, start, len
    rows = [[(1, 0, 8), (0, 8, 1), (0, 9, 1)], [(0, 0, 1), (1, 1, 8), (0, 9, 1)]]
    lod = torch.tensor([[e[0] for e in r] for r in rows])
    ss = torch.tensor([[e[1] for e in r] for r in rows])
    sl = torch.tensor([[e[2] for e in r] for r in rows])
    valid = torch.ones_like(lod, dtype=torch.bool)
    wc = WorkingContext(torch.zeros(2, 3, C), ss.float(), lod, ss, sl, valid, torch.zeros(2, dtype=torch.long))
    scores = torch.tensor([[0.5, 0.2, 0.9], [0.4, -0.6, 0.9]])
    # tail_start = max gist end = 9: the raw entry at 9 is shared tail, excluded
    pol = policy_scores(scores, wc, V=2)
    torch.testing.assert_close(pol, torch.tensor([[-0.5 + 0.2, 0.6 + 0.4]]))


def test_stability_helpers():
    valid = torch.tensor([[True, True, False], [True, True, True]])
    s = torch.tensor([[0.3, -0.3, 9.0], [0.0, 0.0, 0.0]])
    assert policy_kl(torch.zeros(2, 3), valid) == 0
    assert policy_kl(s, valid) > 0
    bs = BudgetSmoother(0.5)
    p1 = bs.penalty(torch.tensor([[0.2, 0.2, 0.0], [0.6, 0.6, 0.6]]), valid)  # means 0.2, 0.6; target 0.4
    torch.testing.assert_close(p1, torch.tensor(0.04))
    assert bs.ema.value is None  # nothing committed inside the step
    bs.penalty(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), valid)  # second micro-batch: means 0, 0
    bs.commit()
    torch.testing.assert_close(bs.ema.value, torch.tensor(0.2))  # mean of the step's 4 rows
    bs.penalty(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), valid)
    bs.commit()
    torch.testing.assert_close(bs.ema.value, torch.tensor(0.6))  # 0.5 * 0.2 + 0.5 * 1.0
    an = AdvantageNormalizer(0.5)
    d = torch.tensor([[0.0, 1.0, 3.0]])
    cand = torch.tensor([[False, True, True]])
    gap = d[:, None, :] - d[:, :, None]
    torch.testing.assert_close(an.weights(gap, d, cand), (gap / (1.0 + 1e-6)).clamp(0, 3))  # own spread 1.0
    an.commit()
    torch.testing.assert_close(an.weights(2 * gap, 2 * d, cand), (2 * gap / (1.0 + 1e-6)).clamp(0, 3))
    an.commit()  # spread 2.0 observed: EMA 0.5 * 1 + 0.5 * 2
    torch.testing.assert_close(an.ema.value, torch.tensor(1.5))
    restored = AdvantageNormalizer(0.5)
    restored.load_state_dict(an.state_dict())
    torch.testing.assert_close(restored.ema.value, torch.tensor(1.5))


def _planted_delta(plan, marker, B, V, g):
    """ΔNLL of each variant: 3 nats if the marker block is compressed, + small per-block costs, + noise."""
    comp = (plan[:, :P:BS] == 1).view(B, V, P // BS).float()  # block j is a gist in row (b, v)
    cost = 0.3 * torch.rand(B, 1, P // BS, generator=g)
    cost[torch.arange(B), 0, marker] = 3.0
    d = (comp * cost).sum(-1) + 0.1 * torch.randn(B, V, generator=g)
    d[:, 0] = 0.0
    return d + 4.0  # horizon NLL; the baseline is column 0




def planted_problem(seed: int):
    """(hit rate of the marker block among 64 fresh histories, span corr of the first 10 / last 20 steps)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    B, N, W = 8, 6, 30 + 7 * 4  # E_min = 14 gists + 16 raw; room for 4 expansions
    net = LensNet(C, layers=1, d_model=32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    corr = []
    for _ in range(STEPS):
        marker = torch.randint(0, P // BS, (B,), generator=g)
        plan, wc = _wc(B, N, W, g, marker)
        h = _planted_delta(plan, marker, B, 1 + N, g)
        out = lens_preference_loss(net(wc), wc, h, temperature=0.1, hard_negative_ratio=0.75, block_size=BS,
                                   history_len=T)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        corr.append(float(out.metrics["mc/pref_span_corr"]))
    # evaluate on fresh histories in the coarsest working context: every compressible block is a gist
    Be = 64
    marker = torch.randint(0, P // BS, (Be,), generator=g)
    levels = _history(Be, g, marker)
    plan = torch.zeros(Be, T, dtype=torch.int8)
    plan[:, :P] = 1
    wc = build_working_context(plan, levels, BS)
    with torch.no_grad():
        s = net(wc)
    gist = wc.valid & (wc.lod == 1)
    top = s.masked_fill(~gist, -2.0).argmax(1)
    top_block = wc.span_start[torch.arange(Be), top] // BS
    hit = float((top_block == marker).float().mean())
    return hit, sum(corr[:10]) / 10, sum(corr[-20:]) / 20


def test_planted_problem_lensnet_learns_to_expand_the_costly_block(single_thread):
    hit, first, last = planted_problem(0)
    print(f"planted: hit={hit:.2f} span_corr={last:.2f} first={first:.2f}")
    # chance is 1/14 (a fresh LensNet scores 0 everywhere, so argmax takes the first gist). Seeds 0-11 all
    # reached hit 1.00 (2026-12-06, 2-core box), far above the bar.
    assert hit >= 0.7, f"marker block ranked first in only {hit:.2f} of samples"
    # span-level alignment with the measured cost (bounded: the small per-block costs are unpredictable);
    # seeds 0-11: first 10 steps 0.31-0.42, last 20 steps 0.46-0.56
    assert last > 0.3, f"span corr of the last 20 steps {last:.2f} (first 10: {first:.2f})"
