"""
LensNet's preference loss: learn from measured ΔNLL which working-context variants are better.

Setting. A micro-batch has B samples, each with V = 1 + N working contexts (rows ordered (sample,
variant), variant 0 = the recency baseline) and their horizon NLL h [B, V] (MCResult.horizon_nll: the
mean NLL on the shared raw tail). The advantage of a variant is ΔNLL_v = h_v - h_0 (lower = better).
LensNet scores every entry e of every row: ŝ_e in [-1, 1], + = "this deserves (or deserves to keep)
more detail", - = "this can be coarser".

Policy score of a variant (a function of per-entry scores). With G_v the gist entries of row v
(lod >= 1) and F_v its raw entries before the shared raw tail (span_start < tail_start):
    s_v = mean_{e in G_v} (-ŝ_e) + mean_{e in F_v} ŝ_e        (an empty mean is 0)
A variant scores high when it compressed what LensNet calls unimportant (gists with ŝ < 0) and kept
raw what LensNet calls important (raw with ŝ > 0). Variants of one sample spend (almost) the same
budget W (mc/train/variants.py), so they differ in WHERE detail goes, and s_i > s_j says LensNet would rather
have i's allocation. The allocator expands high-ŝ gists and collapses low-ŝ raw spans, i.e. it moves
toward high s_v, so "LensNet prefers the better variant" is exactly what the allocator needs.
tail_start[b] (default) = the largest span end of any gist in any row of sample b: everything after it
is raw in every compressed variant and carries no preference.

Pairs. For sample b, candidate variants c_v (default: the compressed ones, v >= 1; the baseline covers
a different history, include it with include_baseline=True) and every ordered pair (i, j) of
candidates with ΔNLL_i < ΔNLL_j (i better; ties give no pair), gap_ij = ΔNLL_j - ΔNLL_i > 0.
Hard-negative filter: keep the ceil(ratio * P) pairs of the batch with the largest gap (P = number of
pairs; ratio = 1 keeps all). Those are the pairs where the measured preference is clearest.

Bradley–Terry loss, over kept pairs K with optional weights w_ij:
    L_BT = sum_K w_ij * -log σ((s_i - s_j) / τ) / sum_K w_ij
τ = lens_temperature (lower = sharper). With an AdvantageNormalizer, w_ij = clamp(gap_ij / scale, 0, 3)
where scale is a per-optimizer-step EMA (beta = lens_adv_norm_beta) of the per-sample spread
mean |ΔNLL - sample mean|: pairs with big measured differences count more, on a scale that is stable
across training. The EMAs here advance once per optimizer step (commit), from statistics summed over
the step's micro-batches and ranks, so results do not depend on the micro-batch/process split.

Stability helpers (simple, optional):
- policy_kl: KL(p_ref || p) between per-row softmaxes of reference scores (e.g. a frozen copy's, or
  None = uniform) and current scores, over valid entries, / τ: keeps the policy from moving too fast.
- BudgetSmoother: the row "budget pressure" b_r = mean of ŝ over valid entries (net expand vs collapse
  demand); penalty mean_r (b_r - m)^2 with m a per-step EMA (beta = lens_budget_smooth_beta) of the
  mean b_r, so the allocator's demand does not swing between steps.

Metrics (0-d detached tensors, nothing syncs with the device):
  mc/lens_loss                 the total loss returned (BT + weighted regularizers)
  mc/lens_pairs                number of kept pairs
  mc/preference_corr_mean|max  per sample, Pearson corr over candidates of (s_v, -ΔNLL_v); mean / max
                               over samples where it is defined (>= 2 candidates, nonzero variances)
  mc/pref_span_corr            per sample, over LOD1 blocks j of the history: corr between the mean ŝ of
                               the gists covering j and cost_j = mean ΔNLL of variants where j is
                               compressed - mean ΔNLL where it is not; averaged over samples (needs
                               block_size and history_len)
  mc/policy_score_abs_mean     mean |ŝ| over valid entries
  mc/policy_score_std_mean     mean over rows of the std of ŝ over the row's valid entries
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _masked_mean(x, mask, dim):
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def policy_scores(scores: torch.Tensor, wc, V: int, tail_start: torch.Tensor | None = None) -> torch.Tensor:
    """[R, L] entry scores of rows ordered (sample, variant) -> policy score s [B, V] (module docstring).
    tail_start: long [B] (default: the end of the last gist of any row of the sample)."""
    R, L = scores.shape
    if R % V:
        raise ValueError(f"{R} rows are not a multiple of V={V} variants per sample")
    B = R // V
    gist = wc.valid & (wc.lod >= 1)
    if tail_start is None:
        end = (wc.span_start + wc.span_len).masked_fill(~gist, 0)
        tail_start = end.max(1).values.view(B, V).max(1).values
    tail_row = tail_start.repeat_interleave(V)[:, None]
    raw = wc.valid & (wc.lod == 0) & (wc.span_start < tail_row)
    s = _masked_mean(-scores, gist, 1) + _masked_mean(scores, raw, 1)
    return s.view(B, V)


def advantages(horizon_nll: torch.Tensor) -> torch.Tensor:
    """ΔNLL [B, V] = h_v - h_baseline (column 0)."""
    return horizon_nll - horizon_nll[:, :1]


def candidate_mask(B: int, V: int, device, include_baseline: bool = False,
                   variant_mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, V]: variants that take part in pairs (variant_mask: e.g. False for deduplicated rows)."""
    cand = torch.ones(B, V, dtype=torch.bool, device=device)
    if not include_baseline:
        cand[:, 0] = False
    if variant_mask is not None:
        cand = cand & variant_mask
    return cand


def preference_pairs(delta: torch.Tensor, cand: torch.Tensor):
    """pairs bool [B, V, V] (pairs[b, i, j]: i, j candidates, ΔNLL_i < ΔNLL_j, i is better) and
    gap [B, V, V] = ΔNLL_j - ΔNLL_i."""
    gap = delta[:, None, :] - delta[:, :, None]
    pairs = cand[:, :, None] & cand[:, None, :] & (gap > 0)
    return pairs, gap


def hard_negative_filter(pairs: torch.Tensor, gap: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the ceil(ratio * P) pairs of the whole batch with the largest gap (ties broken by order)."""
    if ratio >= 1.0:
        return pairs
    flat = torch.where(pairs, gap, torch.full_like(gap, -math.inf)).flatten()
    order = flat.argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    k = torch.ceil(ratio * pairs.sum().to(torch.float32))
    return pairs & (rank.view_as(pairs) < k)


def bradley_terry_loss(policy: torch.Tensor, pairs: torch.Tensor, temperature: float = 1.0,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean over pairs (i better than j) of -log σ((s_i - s_j) / τ), optionally weighted; 0 if no pair."""
    z = (policy[:, :, None] - policy[:, None, :]) / temperature
    w = pairs.to(policy.dtype) if weight is None else pairs.to(policy.dtype) * weight
    return (F.softplus(-z) * w).sum() / w.sum().clamp(min=1e-8)


class _StepEMA:
    """An EMA advanced once per optimizer step, from the mean of a statistic over all the step's
    micro-batches and ranks. Inside a step every micro-batch reads the same committed value, so the
    result does not depend on how the step's rows are split into micro-batches or processes (the
    trainer's DDP-equivalence and exact-resume guarantees). Before the first commit `value` is None.

    observe(sum, count) accumulates on the device (no sync); commit(all_reduce=None) folds the
    step's mean in (all_reduce: a function summing a tensor over ranks in place, e.g. the trainer's
    dist.all_reduce; None in one process). state_dict() syncs: call it at checkpoint time only."""

    def __init__(self, beta: float):
        self.beta = beta
        self.value = None  # 0-d float32 tensor
        self._acc = None  # [sum, count]

    def observe(self, total: torch.Tensor, count: torch.Tensor):
        obs = torch.stack([total.detach().float(), count.detach().float()])
        self._acc = obs if self._acc is None else self._acc + obs

    def commit(self, all_reduce=None):
        if self._acc is None:
            return
        acc, self._acc = self._acc, None
        if all_reduce is not None:
            all_reduce(acc)
        mean = acc[0] / acc[1].clamp(min=1.0)
        # a step without observations, or with a non-finite one (a step the trainer's guard skips),
        # leaves the EMA where it was; decided on the device, no sync
        keep = (acc[1] <= 0) | ~torch.isfinite(mean)
        if self.value is None:
            self.value = torch.where(keep, torch.ones_like(mean), mean)  # no spread seen yet: unit scale
        else:
            self.value = torch.where(keep, self.value, self.beta * self.value + (1 - self.beta) * mean)

    def state_dict(self):
        return {"value": None if self.value is None else float(self.value)}

    def load_state_dict(self, state, device=None):
        v = state.get("value")
        self.value = None if v is None else torch.tensor(v, dtype=torch.float32, device=device)
        self._acc = None


class _EMAHolder:
    """commit / state_dict / load_state_dict of a helper whose only state is one _StepEMA (self.ema)."""

    def commit(self, all_reduce=None):
        self.ema.commit(all_reduce)

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state, device=None):
        self.ema.load_state_dict(state, device)


class AdvantageNormalizer(_EMAHolder):
    """Pair weights w_ij = clamp(gap_ij / scale, 0, 3) on a scale that is stable across training.

    scale = a per-step EMA (beta = --mc_lens_adv_norm_beta) of the per-sample ΔNLL spread
    (mean |ΔNLL_v - mean_v ΔNLL| over the sample's candidates). Until the first commit (step 0) each
    sample uses its own spread. Since the BT loss divides by sum w, the scale only matters through the
    clamp: pairs more than 3 typical spreads apart stop counting more."""

    def __init__(self, beta: float = 0.99, eps: float = 1e-6):
        self.ema, self.eps = _StepEMA(beta), eps

    @staticmethod
    def spread(delta: torch.Tensor, cand: torch.Tensor):
        """(per-sample spread [B], defined [B]: >= 1 candidate)."""
        centred = delta - _masked_mean(delta, cand, 1)[:, None]
        return _masked_mean(centred.abs(), cand, 1), cand.any(1)

    def weights(self, gap: torch.Tensor, delta: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """[B, V, V] pair weights; records this micro-batch's spreads for the step's commit."""
        spread, ok = self.spread(delta.detach(), cand)
        self.ema.observe((spread * ok).sum(), ok.sum())
        scale = spread[:, None, None] if self.ema.value is None else self.ema.value
        return (gap / (scale + self.eps)).clamp(0.0, 3.0)


def policy_kl(scores: torch.Tensor, valid: torch.Tensor, ref_scores: torch.Tensor | None = None,
              temperature: float = 1.0) -> torch.Tensor:
    """mean over rows with a valid entry of KL(softmax(ref/τ) || softmax(scores/τ)) over valid entries;
    ref None = uniform."""
    neg = torch.finfo(scores.dtype).min
    logq = (scores / temperature).masked_fill(~valid, neg).log_softmax(1)
    if ref_scores is None:
        ref_scores = torch.zeros_like(scores)
    logp = (ref_scores.detach() / temperature).masked_fill(~valid, neg).log_softmax(1)
    kl = (logp.exp() * (logp - logq)).masked_fill(~valid, 0.0).sum(1)
    rows = valid.any(1)
    return _masked_mean(kl, rows, 0)


class BudgetSmoother(_EMAHolder):
    """Penalty mean_r (b_r - m)^2: b_r = mean ŝ over row r's valid entries (the row's net demand to
    expand or collapse), m = a per-step EMA (beta = --mc_lens_budget_smooth_beta) of the mean b_r;
    before the first commit m = this micro-batch's mean (detached). Keeps the allocator's demand from
    swinging between steps."""

    def __init__(self, beta: float = 0.9):
        self.ema = _StepEMA(beta)

    def penalty(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b = _masked_mean(scores, valid, 1)
        rows = valid.any(1)
        self.ema.observe((b.detach() * rows).sum(), rows.sum())
        target = _masked_mean(b.detach(), rows, 0) if self.ema.value is None else self.ema.value
        return _masked_mean((b - target).square(), rows, 0)


def _pearson(x, y, mask, dim):
    """Pearson correlation along dim over mask; also returns whether it is defined."""
    m = mask.to(x.dtype)
    n = m.sum(dim, keepdim=True)
    xc = (x - (x * m).sum(dim, keepdim=True) / n.clamp(min=1)) * m
    yc = (y - (y * m).sum(dim, keepdim=True) / n.clamp(min=1)) * m
    vx, vy = xc.square().sum(dim), yc.square().sum(dim)
    ok = (n.squeeze(dim) >= 2) & (vx > 1e-12) & (vy > 1e-12)
    corr = (xc * yc).sum(dim) / (vx * vy).clamp(min=1e-24).sqrt()
    return torch.where(ok, corr, torch.zeros_like(corr)), ok


def preference_corr(policy: torch.Tensor, delta: torch.Tensor, cand: torch.Tensor):
    """(mean, max) over samples of corr(s_v, -ΔNLL_v) over candidates; 0 where undefined everywhere."""
    corr, ok = _pearson(policy.detach(), -delta.detach(), cand, 1)
    mean = _masked_mean(corr, ok, 0)
    mx = torch.where(ok, corr, torch.full_like(corr, -math.inf)).max()
    return mean, torch.where(ok.any(), mx, torch.zeros_like(mx))


def span_preference_corr(scores: torch.Tensor, wc, delta: torch.Tensor, cand: torch.Tensor, block_size: int,
                         history_len: int) -> torch.Tensor:
    """mc/pref_span_corr (module docstring): corr over LOD1 blocks of (mean covering-gist score, cost)."""
    B, V = delta.shape
    R = scores.size(0)
    n1 = history_len // block_size
    gist = wc.valid & (wc.lod >= 1)
    lo = (wc.span_start // block_size).clamp(0, n1).masked_fill(~gist, n1)
    hi = ((wc.span_start + wc.span_len) // block_size).clamp(0, n1).masked_fill(~gist, n1)
    s = scores.detach().to(torch.float32) * gist
    cov = torch.zeros(R, n1 + 1, device=scores.device)
    cov.scatter_add_(1, lo, gist.to(torch.float32)).scatter_add_(1, hi, -gist.to(torch.float32))
    sc = torch.zeros(R, n1 + 1, device=scores.device)
    sc.scatter_add_(1, lo, s).scatter_add_(1, hi, -s)
    comp = (cov.cumsum(1)[:, :n1] > 0.5).view(B, V, n1)  # block j compressed in row (b, v)
    blk_score = sc.cumsum(1)[:, :n1].view(B, V, n1)
    c = cand[:, :, None]
    d = delta.detach().to(torch.float32)[:, :, None]
    inc, exc = comp & c, ~comp & c
    cost = _masked_mean(d.expand_as(inc), inc, 1) - _masked_mean(d.expand_as(exc), exc, 1)  # [B, n1]
    unit_score = _masked_mean(blk_score, inc, 1)
    defined = inc.any(1) & exc.any(1)
    corr, ok = _pearson(unit_score, cost, defined, 1)
    return _masked_mean(corr, ok, 0)


@dataclass
class LensLoss:
    loss: torch.Tensor  # 0-d, with grad into LensNet
    policy: torch.Tensor  # [B, V] policy scores (with grad)
    delta: torch.Tensor  # [B, V] ΔNLL (detached)
    pairs: torch.Tensor  # bool [B, V, V] kept pairs
    metrics: dict


def lens_preference_loss(scores: torch.Tensor, wc, horizon_nll: torch.Tensor, temperature: float = 1.0,
                         hard_negative_ratio: float = 1.0, include_baseline: bool = False,
                         variant_mask: torch.Tensor | None = None, tail_start: torch.Tensor | None = None,
                         adv_normalizer: AdvantageNormalizer | None = None, kl_weight: float = 0.0,
                         ref_scores: torch.Tensor | None = None, budget_smoother: BudgetSmoother | None = None,
                         budget_weight: float = 0.0, block_size: int | None = None,
                         history_len: int | None = None) -> LensLoss:
    """The whole LensNet objective for one micro-batch (module docstring). scores: LensNet(wc) [R, L],
    rows ordered (sample, variant); horizon_nll [B, V]. Nothing here syncs with the device."""
    B, V = horizon_nll.shape
    if scores.shape != wc.valid.shape or scores.size(0) != B * V:
        raise ValueError(f"scores {tuple(scores.shape)} must match the WC {tuple(wc.valid.shape)} with B*V={B * V} rows")
    delta = advantages(horizon_nll.detach().to(torch.float32))
    cand = candidate_mask(B, V, delta.device, include_baseline, variant_mask)
    policy = policy_scores(scores.to(torch.float32), wc, V, tail_start)
    pairs, gap = preference_pairs(delta, cand)
    pairs = hard_negative_filter(pairs, gap, hard_negative_ratio)
    weight = None if adv_normalizer is None else adv_normalizer.weights(gap, delta, cand)
    loss = bradley_terry_loss(policy, pairs, temperature, weight)
    if kl_weight > 0:
        loss = loss + kl_weight * policy_kl(scores, wc.valid, ref_scores, temperature)
    if budget_smoother is not None and budget_weight > 0:
        loss = loss + budget_weight * budget_smoother.penalty(scores, wc.valid)
    sd = scores.detach().to(torch.float32)
    corr_mean, corr_max = preference_corr(policy, delta, cand)
    row_std = _masked_mean((sd - _masked_mean(sd, wc.valid, 1)[:, None]).square(), wc.valid, 1).sqrt()
    metrics = {
        "mc/lens_loss": loss.detach(),
        "mc/lens_pairs": pairs.sum(),
        "mc/preference_corr_mean": corr_mean,
        "mc/preference_corr_max": corr_max,
        "mc/policy_score_abs_mean": _masked_mean(sd.abs(), wc.valid, (0, 1)),
        "mc/policy_score_std_mean": _masked_mean(row_std, wc.valid.any(1), 0),
    }
    if block_size is not None and history_len is not None:
        metrics["mc/pref_span_corr"] = span_preference_corr(scores, wc, delta, cand, block_size, history_len)
    return LensLoss(loss, policy, delta, pairs, metrics)
