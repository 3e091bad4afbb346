"""The variant budget (mc/train/variant_budget.py): N_t follows the committed ΔNLL spread within
[--mc_min_variants, N] and the positions budget; the controller draws the first N_t of the N variants, the same
for any micro-batch split, and the state survives a checkpoint; bad settings get one clear error."""

import math

import pytest
import torch

from mc.config import MCConfig
from mc.train.controller import MCController
from mc.train.variant_budget import VariantBudget
from tests.test_mc_controller import batch, make

pytestmark = pytest.mark.usefixtures("single_thread")


def committed(budget, spreads, n=4):
    """Commit one step per spread: every sample's n variants at ΔNLL = ±spread around 0 (mean |dev| = spread)."""
    for s in spreads:
        delta = torch.tensor([[s, -s] * (n // 2)] * 8) * math.sqrt((n - 1) / n)
        budget.observe(delta)
        budget.commit()


def test_fixed_budget_without_the_flags():
    b = VariantBudget(MCConfig(num_random_variants=4))
    committed(b, [1.0, 0.01, 0.01])
    assert [b.variants(step, 100, 512) for step in range(3)] == [4, 4, 4]
    assert b.spread.value is None  # nothing observed without --mc_dynamic_variants


def test_variants_follow_the_spread_against_its_peak():
    b = VariantBudget(MCConfig(num_random_variants=6, dynamic_variants=True, min_variants=2))
    assert b.variants(0, 100, 512) == 6  # nothing committed yet: all of them
    committed(b, [1.0])
    assert b.variants(1, 100, 512) == 6 and b.peak == pytest.approx(1.0)
    committed(b, [0.45] * 60)  # the EMA (beta 0.9) settles near 0.45 of the peak: ceil(6 x 0.45) = 3
    assert b.variants(2, 100, 512) == 3
    assert b.variants(2, 100, 512) == 3  # the step's other micro-batches reuse the answer
    committed(b, [0.01] * 60)
    assert b.variants(3, 100, 512) == 2  # never below --mc_min_variants
    committed(b, [2.0] * 60)
    assert b.variants(4, 100, 512) == 6 and b.peak > 1.9  # a new peak


def test_the_spread_does_not_shrink_with_fewer_variants():
    """The mean absolute deviation of n normal draws is sqrt((n - 1) / n) of the population's: corrected, two
    variants and eight read the same spread."""
    g = torch.Generator().manual_seed(0)
    reads = {}
    for n in (2, 8):
        b = VariantBudget(MCConfig(num_random_variants=8, dynamic_variants=True))
        b.observe(torch.randn(40000, n, generator=g))
        b.commit()
        reads[n] = float(b.spread.value)
    assert reads[2] == pytest.approx(reads[8], rel=0.03)
    assert reads[8] == pytest.approx(math.sqrt(2 / math.pi), rel=0.03)


def test_positions_budget_caps_the_variants_while_w_is_wide():
    b = VariantBudget(MCConfig(num_random_variants=4, positions_budget=3.0))
    # (T + (1 + N) W) / T <= 3 at T = 512: N <= 2 T / W - 1
    assert [b.cap(W, 512) for W in (512, 256, 128, 100)] == [1, 3, 4, 4]
    assert b.variants(0, 256, 512) == 3 and b.variants(1, 128, 512) == 4
    with pytest.raises(ValueError, match="--mc_positions_budget=3 leaves 1 variants.*at least 4.00"):
        VariantBudget(MCConfig(num_random_variants=4, positions_budget=3.0)).check(512, 512)
    VariantBudget(MCConfig(num_random_variants=4, positions_budget=3.0)).check(256, 512)  # 3 >= 2: fine


@pytest.mark.parametrize("kw, match", [(dict(dynamic_variants=True, min_variants=5), "--mc_min_variants=5 exceeds"),
                                       (dict(positions_budget=1.0), "must exceed 1"),
                                       (dict(min_variants=1), "--mc_min_variants=1 must be >= 2"),
                                       (dict(dynamic_variants=True, lensnet_type="none"), "no LensNet")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        MCConfig(num_random_variants=4, **kw)


def test_the_controller_draws_the_first_n_t_variants_and_logs_them():
    """With the budget at 2 of 4 variants, the rows are the first 2 of the 4 a fixed-N controller draws."""
    x, y = batch(B=2)
    ids = torch.arange(2)
    model, mods, cfg = make(num_variants=4)
    full = MCController(model, mods, cfg, total_steps=10).process_batch(x, y, step=0, row_ids=ids)
    model, mods, cfg = make(num_variants=4, positions_budget=1 + (1 + 2) * 80 / 160)  # W at step 0 = 80
    ctl = MCController(model, mods, cfg, total_steps=10)
    capped = ctl.process_batch(x, y, step=0, row_ids=ids)
    assert capped.metrics["mc/variants_per_sample"] == 3 and full.metrics["mc/variants_per_sample"] == 5
    first = full.plans.view(2, 5, -1)[:, :3].reshape(6, -1)
    assert torch.equal(capped.plans, first)
    later = ctl.process_batch(x, y, step=9, row_ids=ids)  # W = 58: room for 3 within the same positions
    assert later.metrics["mc/variants_per_sample"] == 4


def test_dynamic_variants_are_the_same_for_any_split_and_survive_a_checkpoint():
    model, mods, cfg = make(num_variants=4, dynamic_variants=True, min_variants=2)
    x, y = batch(B=4)
    ids = torch.arange(4)
    one = MCController(model, mods, cfg, total_steps=10)
    two = MCController(model, mods, cfg, total_steps=10)
    counts = []
    for step in range(6):
        whole = one.process_batch(x, y, step=step, row_ids=ids)
        one.commit_step()
        halves = [two.process_batch(x[s], y[s], step=step, row_ids=ids[s]) for s in (slice(0, 2), slice(2, 4))]
        two.commit_step()
        counts.append(whole.metrics["mc/variants_per_sample"])
        assert all(h.metrics["mc/variants_per_sample"] == counts[-1] for h in halves)
        assert torch.equal(whole.plans, torch.cat([h.plans for h in halves]))
    assert one.lens_state_dict()["variants"]["spread"]["value"] == pytest.approx(
        two.lens_state_dict()["variants"]["spread"]["value"], rel=1e-5)
    restored = MCController(model, mods, cfg, total_steps=10)
    restored.load_lens_state(one.lens_state_dict())
    a = one.process_batch(x, y, step=6, row_ids=ids)
    b = restored.process_batch(x, y, step=6, row_ids=ids)
    assert a.metrics["mc/variants_per_sample"] == b.metrics["mc/variants_per_sample"]
    assert torch.equal(a.plans, b.plans)
    assert 3 <= min(counts) and max(counts) == 5  # all 4 variants at first; the spread then moves N_t
