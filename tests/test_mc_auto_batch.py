"""
mc/train/auto_batch.py: the variant multiplier, the divisor choice, the batch plan (tokens per step kept,
clear errors), and, end to end through scripts.base_train, that an MC auto-batched run trains on
exactly the token rows of the vanilla run at every optimizer step.
"""

import pytest
import torch

import scripts.base_train as base_train
from mc.config import MCConfig
from mc.train.auto_batch import choose_micro_batch_divisor, mc_batch_plan, plan_micro_batch, variant_multiplier
from nanochat.dataloader import DistributedTokenLoader


def test_variant_multiplier():
    assert variant_multiplier(2048, 4, 2048) == 6.0  # 1 full row + 5 full-length working contexts
    assert variant_multiplier(2048, 4, 512) == pytest.approx(2.25)
    assert variant_multiplier(100, 0, 100) == 2.0
    with pytest.raises(ValueError, match="L_max"):
        variant_multiplier(100, 2, 101)


@pytest.mark.parametrize("B, mult, d", [(32, 5.06, 8), (32, 1.0, 1), (8, 2.5, 4), (12, 5, 6), (7, 2, 7),
                                        (7, 8, 7), (1, 3, 1), (6, 6.0, 6)])
def test_choose_divisor(B, mult, d):
    assert choose_micro_batch_divisor(B, mult) == d
    assert B % d == 0


def test_plan_keeps_tokens_per_step():
    for B, T, world, total, mult in [(32, 2048, 1, 524288, 5.06), (32, 2048, 8, 524288, 3.0), (8, 512, 1, 8192, 2.5),
                                     (6, 64, 2, 6 * 64 * 2 * 3, 4.0), (5, 10, 1, 100, 9.0)]:
        p = plan_micro_batch(total, B, T, world, mult)
        assert p.device_batch_size * T * world * p.grad_accum_steps == total == p.tokens_per_step
        assert p.device_batch_size * p.divisor == B
        assert p.fits == (mult <= p.divisor)
    p = plan_micro_batch(524288, 32, 2048, 1, 5.06)
    assert (p.device_batch_size, p.grad_accum_steps) == (4, 64)


def test_plan_errors_name_the_flags():
    with pytest.raises(ValueError, match="--total_batch_size=1000 is not a multiple"):
        plan_micro_batch(1000, 8, 64, 1, 2.0)
    with pytest.raises(ValueError, match="--device_batch_size"):
        choose_micro_batch_divisor(0, 2.0)


def test_mc_batch_plan_from_config():
    # T=2048, W anneals from 0.8 T = 1638 (padded to 1664 = 13 x 128) down to 0.2 T; N = 4
    cfg = MCConfig(num_random_variants=4, train_wc_length=0.2, recent_tokens=128)
    p = mc_batch_plan(cfg, 524288, 32, 2048, 1, num_iterations=1000)
    assert p.multiplier == pytest.approx((2048 + 5 * 1664) / 2048)
    assert (p.device_batch_size, p.grad_accum_steps, p.divisor, p.fits) == (4, 64, 8, True)
    off = mc_batch_plan(MCConfig(num_random_variants=4, auto_batch=False), 524288, 32, 2048, 1, 1000)
    assert (off.device_batch_size, off.grad_accum_steps, off.divisor, off.fits) == (32, 8, 1, False)
    with pytest.raises(ValueError, match="--allocator_recent_tokens"):
        mc_batch_plan(MCConfig(train_wc_length=64, recent_tokens=128), 524288, 32, 2048, 1, 1000)


# --------------------------------------------------------------------------------------------------
TINY = ["--device_type=cpu", "--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64",
        "--total_batch_size=512", "--eval_every=-1", "--eval_tokens=512", "--sample_every=-1", "--log_every=0",
        "--warmup_ratio=0", "--num_iterations=3", "--device_batch_size=4"]
MC = ["--mc_enabled=1", "--mc_block_size=8", "--mc_train_wc_length=24", "--allocator_recent_tokens=8",
      "--mc_num_random_variants=2", "--gistnet_layers=1"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def base_dir(tiny_base_dir):
    return tiny_base_dir


def record_rows(monkeypatch, base_dir, flags, capsys):
    """Run base_train in-process; return the x rows of every training micro-batch, in order, and stdout."""
    rows = []

    class Spy(DistributedTokenLoader):
        def next_batch(self):
            x, y = super().next_batch()
            if self.split == "train":
                rows.append(x.clone())
            return x, y

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(base_train, "DistributedTokenLoader", Spy)
    base_train.main([*TINY, *flags])
    return rows, capsys.readouterr().out


def test_auto_batched_mc_run_sees_the_baseline_rows(monkeypatch, base_dir, capsys):
    base_rows, out = record_rows(monkeypatch, base_dir, ["--model_tag=ab_base"], capsys)
    assert "4 rows × 64 × 1 proc × 2 grad accum" in out
    mc_rows, out = record_rows(monkeypatch, base_dir, ["--model_tag=ab_mc", *MC], capsys)
    # (64 + 3 × 56) / 64 = 3.6 -> divisor 4 of B=4: one row per micro-step, 8 micro-steps per step
    assert "1 rows × 64 × 1 proc × 8 grad accum" in out and "divisor 4" in out
    steps = 3
    base_steps = [torch.cat(base_rows[2 * n: 2 * n + 2]) for n in range(steps)]
    mc_steps = [torch.cat(mc_rows[8 * n: 8 * n + 8]) for n in range(steps)]
    for n in range(steps):
        assert torch.equal(base_steps[n], mc_steps[n]), n
    assert "mc | tok" in out
