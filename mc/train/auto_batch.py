"""
Auto-batch: fit the MC training step into the memory of the vanilla recipe without changing what an
optimizer step trains on (seed 001: MC and baseline runs must line up step for step).

One optimizer step consumes total_batch_size = B × T × world × accum tokens, and the data loader's
contract gives step n the global rows [n R, (n+1) R), R = B × world × accum, however R is split. So
shrinking the micro-batch B by a divisor d of B and multiplying accum by d keeps total_batch_size, the
rows of every step and their order identical; only the number of micro-steps changes.

How big is an MC micro-batch? Per row the GPT runs the full sequence (T positions, the LM loss) plus
(1 + N) packed working contexts of L <= T slots, so activations grow by about

    multiplier = (T + (1 + N) × L_max) / T        (L_max: the longest padded working context of the
                                                  run, at the start of the W anneal)

over a vanilla row. GistNet adds a little (a small network over the T token embeddings) that the
slack of rounding up to a divisor covers. choose_micro_batch_divisor(B, multiplier) picks the
smallest divisor d of B with d >= multiplier (so B / d rows cost at most a vanilla micro-batch),
and B itself (one row per micro-step) when no divisor is that large; plan_micro_batch() then
checks that the split reproduces total_batch_size exactly and raises ValueError when it cannot.
"""

from dataclasses import dataclass


def variant_multiplier(T: int, num_variants: int, max_wc_slots: int) -> float:
    """Activation size of one MC row relative to a vanilla row: (T + (1 + N) L_max) / T."""
    if T < 1 or num_variants < 0 or not 0 < max_wc_slots <= T:
        raise ValueError(f"need T >= 1, N >= 0 and 0 < L_max <= T, got T={T}, N={num_variants}, L_max={max_wc_slots}")
    return (T + (1 + num_variants) * max_wc_slots) / T


def choose_micro_batch_divisor(device_batch_size: int, multiplier: float) -> int:
    """Smallest divisor d of device_batch_size with d >= multiplier; device_batch_size if none is."""
    if device_batch_size < 1:
        raise ValueError(f"--device_batch_size must be >= 1, got {device_batch_size}")
    if multiplier <= 0:
        raise ValueError(f"the variant multiplier must be positive, got {multiplier}")
    for d in range(1, device_batch_size + 1):
        if device_batch_size % d == 0 and d >= multiplier:
            return d
    return device_batch_size


@dataclass(frozen=True)
class BatchPlan:
    device_batch_size: int  # rows per micro-batch per process (after the shrink)
    grad_accum_steps: int  # micro-batches per optimizer step
    divisor: int  # baseline device_batch_size / device_batch_size
    multiplier: float  # the estimated MC cost of a row, relative to vanilla
    tokens_per_step: int  # = total_batch_size, unchanged
    fits: bool  # False when even one row per micro-step exceeds the vanilla micro-batch's memory


def plan_micro_batch(total_batch_size: int, device_batch_size: int, T: int, world_size: int,
                     multiplier: float) -> BatchPlan:
    """The MC split of the baseline batch (see the module docstring). Raises ValueError naming the flags
    when the baseline arithmetic itself does not divide or the shrunk split would not reproduce it."""
    per_fwdbwd = device_batch_size * T * world_size
    if per_fwdbwd <= 0 or total_batch_size % per_fwdbwd:
        raise ValueError(f"--total_batch_size={total_batch_size} is not a multiple of device_batch_size × max_seq_len "
                         f"× world_size = {device_batch_size}×{T}×{world_size}; the MC auto-batcher keeps the baseline "
                         f"batch arithmetic and needs it to divide first")
    accum = total_batch_size // per_fwdbwd
    d = choose_micro_batch_divisor(device_batch_size, multiplier)
    new_b, new_accum = device_batch_size // d, accum * d
    if new_b * d != device_batch_size or new_b * T * world_size * new_accum != total_batch_size:
        raise ValueError(f"--mc_auto_batch cannot reproduce the baseline batch: {new_b}×{T}×{world_size}×{new_accum} "
                         f"!= --total_batch_size={total_batch_size}; pass --mc_auto_batch=0 and set "
                         f"--device_batch_size yourself")
    return BatchPlan(new_b, new_accum, d, multiplier, total_batch_size, fits=multiplier <= d)


def mc_batch_plan(cfg, total_batch_size: int, device_batch_size: int, T: int, world_size: int,
                  num_iterations: int) -> BatchPlan:
    """The trainer's plan for an MCConfig: L_max = the padded working context at the start of the W anneal
    (the longest of the run). With cfg.auto_batch off the split stays the baseline's (divisor 1), and
    `fits` says whether that is within the vanilla memory envelope. Raises ValueError on bad flags."""
    # imported here: base_train imports this module for every run, and a vanilla run never loads the MC step
    from mc.train.controller import default_pad_quantum, padded_length
    from mc.train.variants import annealed_wc_length

    W = cfg.validate_against(T)
    w_max = annealed_wc_length(0, max(num_iterations, 1), cfg.wc_anneal_start_frac, W, T)
    multiplier = variant_multiplier(T, cfg.num_random_variants, padded_length(w_max, T, default_pad_quantum(cfg, T)))
    plan = plan_micro_batch(total_batch_size, device_batch_size, T, world_size, multiplier if cfg.auto_batch else 1.0)
    if not cfg.auto_batch:
        plan = BatchPlan(plan.device_batch_size, plan.grad_accum_steps, 1, multiplier, plan.tokens_per_step,
                         fits=multiplier <= 1.0)
    return plan
