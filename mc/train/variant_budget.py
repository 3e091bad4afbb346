"""
The variant budget: how many compressed variants every sample gets at an optimizer step (issue 18, phase 3).

    budget = VariantBudget(cfg)
    N_t = budget.variants(step, W_t, T) # once per optimizer step: the same for every micro-batch and rank
    budget.observe(delta)               # each micro-batch, ΔNLL [B, N_t] of the compressed variants
    budget.commit(all_reduce)           # after the step's last micro-batch (MCController.commit_step)

Why. A compressed variant costs W GPT positions and buys the variant LM loss on gists and LensNet's preference
pairs. How much the pairs teach depends on how far apart the variants' ΔNLL lie: where every compression of a
sample costs the same, the pairs order measurement noise, and the positions are better spent elsewhere.

The spread of a micro-batch is s = mean over samples of mean_v |ΔNLL_v - mean_v' ΔNLL_v'| (as
mc.train.lens_loss.AdvantageNormalizer measures it), divided by sqrt((n - 1) / n) for n variants per sample:
the mean absolute deviation of n draws is that fraction of the population's (for a normal spread), so a step
with fewer variants does not read as a smaller spread. s_t is a per-step EMA of it (beta SPREAD_BETA),
committed from all micro-batches and ranks (mc.train.lens_loss._StepEMA), and peak_t the largest s_t so far.

    --mc_dynamic_variants=1:  N_t = clamp(ceil(N * s_t / peak_t), --mc_min_variants, N)
                              (N = --mc_num_random_variants; N before the first commit)
    --mc_positions_budget=P:  N_t <= floor((P - 1) T / W_t) - 1, the most variants whose GPT positions per
                              training token, (T + (1 + N_t) W_t) / T, stay within P

The positions budget stands for the step-time budget: a step's time follows its GPT positions (lab notebook,
mc_bench_train), and positions, unlike the clock, give the same N_t on every machine and rerun. The first
optimizer step checks that the budget leaves --mc_min_variants at the run's widest W_t (the anneal's start), so
N_t never falls below it.

Deterministic and split-independent: N_t is a function of W_t and of committed EMAs, the same on every rank
and micro-batch split, and the variants drawn are the first N_t of the N that mc.train.variants.hashed_uniform
keys for the row (a step with fewer variants drops the last ones). Reading s_t is one host sync per optimizer
step, at the step's first micro-batch, right after the trainer's own synchronize for its step time: no stall.
"""

import math

import torch

from mc.train.lens_loss import AdvantageNormalizer, _StepEMA

SPREAD_BETA = 0.9  # the spread EMA's memory, ~10 optimizer steps: N_t follows W_t's anneal and the gists' progress


class VariantBudget:
    def __init__(self, cfg):
        self.cfg = cfg
        self.spread = _StepEMA(SPREAD_BETA)
        self.peak = None  # float: the largest committed spread read so far
        self._step, self._n = None, None

    def cap(self, W: int, T: int) -> int:
        """The most variants the positions budget allows at W (N when there is no budget)."""
        P, N = self.cfg.positions_budget, self.cfg.num_random_variants
        return N if P <= 0 else min(N, math.floor((P - 1) * T / W) - 1)

    def check(self, widest_W: int, T: int):
        """ValueError when the positions budget leaves fewer variants than the run needs at its widest W."""
        need = min(self.cfg.min_variants, self.cfg.num_random_variants)
        if self.cap(widest_W, T) < need:
            P = self.cfg.positions_budget
            raise ValueError(f"--mc_positions_budget={P:g} leaves {max(self.cap(widest_W, T), 0)} variants per sample "
                             f"at W={widest_W} (the widest working context of the run, T={T}), fewer than the {need} "
                             f"it needs: raise it to at least {(T + (1 + need) * widest_W) / T:.2f}, or lower "
                             f"--mc_wc_anneal_start_frac")

    def variants(self, step: int, W: int, T: int) -> int:
        """N_t of optimizer step `step`, whose working contexts hold W entries (module docstring). The first call
        of a step reads the committed spread (one host sync); the step's other micro-batches reuse the answer."""
        if step != self._step:
            N = self.cfg.num_random_variants
            if self.cfg.dynamic_variants and self.spread.value is not None:
                v = float(self.spread.value)
                self.peak = v if self.peak is None else max(self.peak, v)
                if self.peak > 0:
                    N = min(max(math.ceil(N * v / self.peak - 1e-9), self.cfg.min_variants), N)
            self._step, self._n = step, max(min(N, self.cap(W, T)), 1)
        return self._n

    def observe(self, delta: torch.Tensor):
        """Record a micro-batch's ΔNLL [B, n] of its n >= 2 compressed variants (no sync)."""
        n = delta.size(1)
        if not self.cfg.dynamic_variants or n < 2:
            return
        d = delta.detach().float()
        spread, _ = AdvantageNormalizer.spread(d, torch.ones_like(d, dtype=torch.bool))
        spread = spread / math.sqrt((n - 1) / n)
        self.spread.observe(spread.sum(), torch.full((), spread.numel(), device=spread.device))  # no host copy

    def commit(self, all_reduce=None):
        self.spread.commit(all_reduce)

    def state_dict(self) -> dict:
        return {"spread": self.spread.state_dict(), "peak": self.peak}

    def load_state_dict(self, state: dict | None, device=None):
        state = state or {}
        self.spread.load_state_dict(state.get("spread", {}), device)
        self.peak = state.get("peak")
        self._step = None
