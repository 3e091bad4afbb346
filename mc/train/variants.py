"""
The training working-context sampler: for every sequence of a micro-batch, the recency baseline plus
N random block-aligned compressions, as plans (see mc/working_context.py for the plan format).

Plan = int8 [rows, T]: plan[r, t] = the level of detail at which token t appears in row r's working
context (0 raw, 1 inside a LOD1 gist, 2 inside a LOD2 gist), -1 = not in the working context.

- recency baseline: the last W raw tokens, plan = -1 on [0, T-W) and 0 on [T-W, T). It does NOT
  cover the whole history; it is what a plain model with a W-token window would see.
- compressed variant: covers the whole history [0, T). The last R = recent_tokens tokens are raw,
  and so is everything after the last complete block before T-R (the "tail", at least R tokens).
  The compressible prefix [0, P), P = floor((T-R)/bs)*bs, holds n1 = P/bs blocks; units of level l
  are the aligned spans of bs**l tokens inside it: n_l = floor(n1 / bs**(l-1)) of them (LOD2 needs a
  complete 1024-token group, i.e. T >= 1024 + R with bs = 32).

How a variant is drawn. Start from the coarsest covering: every token in the most compressed unit
that contains it (a level-l unit is used unless it sits inside a complete level-(l+1) unit). That has
    E_min = n_L + sum_{l<L} (n_l - bs * n_{l+1}) + (T - P)
entries. "Expanding" a gist replaces it by its bs children (LOD2 -> bs LOD1 gists, LOD1 -> bs raw
tokens): always +(bs-1) entries. A gist can only be expanded once its parent has been, so the
expansions of a variant form a random topological order of the unit tree, and because every
expansion costs the same, "expand random gists while the budget allows" means: take the first
    k = min(total units, floor((W - E_min) / (bs - 1)))
expansions of that random order. All variants therefore use (almost) the whole budget W and differ
in WHERE the detail goes: equal-cost alternatives, which is exactly the comparison LensNet learns from.
Vectorized random topological order: each unit draws u ~ U(0,1); its effective key is
max(u, parent's effective key) (so a child never precedes its parent); a stable sort over units
listed coarse-to-fine breaks ties in the parent's favour. One sort for all rows at once.

Identical plans of one sample (e.g. two variants that happen to coincide, or a variant equal to the
baseline when W >= T) are dropped, keeping the first.

LensNet-proposed variants (--mc_priority_variants, phase 3 of the training plan). A variant whose keys are
    key_j = -log(1 - u_j) / w_j,    w_j = exp(s_j / temperature)
is an exponential race: the first unit to expand is unit j with probability w_j / sum w, the next one is drawn
the same way among the rest (weighted sampling without replacement, Efraimidis & Spirakis), still in a
topological order (a child's key is at least its parent's). s_j is LensNet's score of the entry of the
coarsest covering that holds unit j (priority_keys; the controller scores that covering). With every score
equal the order is uniform again, so these variants are LensNet's likely choices plus exploration: its
preference data then covers the decisions it would make at inference, not only random ones.

annealed_wc_length() is the W curriculum: linear from start_frac * T (little compression) down to the
target W over the anneal steps, then constant.

Split-independent randomness (training). hashed_uniform(row_ids, step, seed, ...) gives each unit of
each variant of each training row its key u from a counter-based hash of (seed, global row id, step,
variant, unit) instead of a generator stream, and sample_variants(keys=...) uses those keys. A row's
variants then depend only on which row it is, never on how the rows were split into micro-batches
or processes: a 2-process run, an auto-batched run and a resumed run draw the same working contexts.
"""

from dataclasses import dataclass

import torch

from mc.tree import min_variant_entries, unit_counts


def annealed_wc_length(step: int, total_steps: int, start_frac: float, target: int, sequence_len: int) -> int:
    """W at this step: round(start + (target - start) * min(1, step / total_steps)), start = start_frac * T.
    Never below target, and never above start (if start <= target, W = target throughout)."""
    start = round(start_frac * sequence_len)
    if start <= target or total_steps <= 0:
        return target
    progress = min(1.0, max(0.0, step / total_steps))
    return max(target, round(start + (target - start) * progress))


def baseline_plan(T: int, W: int, device=None) -> torch.Tensor:
    """Recency baseline plan [T]: the last min(W, T) tokens raw, the rest -1."""
    plan = torch.zeros(T, dtype=torch.int8, device=device)
    plan[: max(T - W, 0)] = -1
    return plan


@dataclass
class VariantPlans:
    plan: torch.Tensor  # int8 [R, T]: per-token level of detail, -1 = not in the working context
    sample_idx: torch.Tensor  # long [R]: which sequence of the micro-batch each row belongs to
    variant_idx: torch.Tensor  # long [R]: 0 = recency baseline, 1..N = compressed variants

    @property
    def is_baseline(self) -> torch.Tensor:
        return self.variant_idx == 0


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32). Every step is a
    bijection of 32-bit words (xor-shift, multiply by an odd constant mod 2**32), and it avalanches:
    each input bit flips each output bit with probability ~1/2. int64 products may wrap past 2**63;
    the low 32 bits of a wrapped product are still exact, and those are all we keep."""
    m = 0xFFFFFFFF
    h = h & m
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & m
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def hashed_uniform(row_ids: torch.Tensor, step: int, seed: int, num_variants: int, num_units: int) -> torch.Tensor:
    """float32 [len(row_ids) * num_variants, num_units] in [0, 1): u = fmix32(chain of (seed, step, row,
    variant, unit)) / 2**32, truncated to 24 bits (exact in float32). Rows are ordered (row, variant),
    the layout sample_variants uses. Pure function of its arguments: no generator state."""
    device = row_ids.device
    h = _fmix32(torch.full((), seed, dtype=torch.long, device=device) ^ 0x5BD1E995)
    h = _fmix32(h + step * 0x9E3779B1)
    h = _fmix32(h[None] + row_ids.long() * 0x27D4EB2F)  # [B]
    v = torch.arange(num_variants, device=device)
    h = _fmix32(h[:, None] + (v[None, :] + 1) * 0x165667B1).reshape(-1)  # [B * V]
    u = torch.arange(num_units, device=device)
    h = _fmix32(h[:, None] ^ _fmix32(u[None, :] * 0x61C88647 + 0x2545F491))  # [B * V, U]
    return (h >> 8).to(torch.float32) * (1.0 / 2**24)


def unit_starts(T: int, block_size: int, max_lod: int, recent_tokens: int, device=None) -> torch.Tensor:
    """long [units]: the first token of every unit, in the keys' layout (coarsest level first)."""
    counts = unit_counts(T, block_size, max_lod, recent_tokens)
    return torch.cat([torch.arange(counts[level - 1], device=device) * block_size ** level
                      for level in range(max_lod, 0, -1)])


def priority_keys(uniform: torch.Tensor, unit_scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Keys of LensNet-proposed variants (module docstring): -log(1 - u) / exp(s / temperature), [rows, units].
    uniform in [0, 1) (hashed_uniform); unit_scores broadcastable to it."""
    return -torch.log1p(-uniform) * torch.exp(-unit_scores.float() / temperature)


def sample_compressed_plans(rows: int, T: int, W: int, block_size: int = 32, max_lod: int = 2,
                            recent_tokens: int = 0, generator: torch.Generator | None = None,
                            device=None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """`rows` independent compressed plans, int8 [rows, T] (see the module docstring).
    keys: optional float [rows, total units] of uniform draws to use instead of the generator
    (units listed coarsest level first); see hashed_uniform."""
    bs = block_size
    counts = unit_counts(T, bs, max_lod, recent_tokens)
    e_min = min_variant_entries(T, bs, max_lod, recent_tokens)
    if W < e_min:
        raise ValueError(f"working-context budget W={W} is below the {e_min} entries of the most compressed "
                         f"covering of T={T} tokens (block_size={bs}, max_lod={max_lod}, recent_tokens={recent_tokens})")
    total_units = sum(counts)
    k = min(total_units, (W - e_min) // (bs - 1))
    rand_device = generator.device if generator is not None else device
    if keys is None:
        keys = torch.rand(rows, total_units, generator=generator, device=rand_device).to(device)
    elif tuple(keys.shape) != (rows, total_units):
        raise ValueError(f"keys must be [rows, units] = [{rows}, {total_units}], got {tuple(keys.shape)}")

    # effective keys, coarse to fine: a unit's key is at least its parent's
    eff, parent = [], None
    for level in range(max_lod, 0, -1):
        n = counts[level - 1]
        k_l = keys[:, sum(counts[level:]): sum(counts[level:]) + n]  # layout: level L units first
        if parent is not None and parent.size(1) > 0:
            inherited = parent.repeat_interleave(bs, dim=1)  # [rows, n_{l+1} * bs], units with a parent
            k_l = torch.cat([torch.maximum(k_l[:, : inherited.size(1)], inherited), k_l[:, inherited.size(1):]], 1)
        eff.append(k_l)
        parent = k_l
    eff = torch.cat(eff, dim=1)  # [rows, total_units], same coarse-to-fine layout as keys
    order = torch.sort(eff, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(total_units, device=device).expand(rows, -1))
    expanded = rank < k  # [rows, total_units]; downward closed by construction

    # token level = number of unexpanded units on its chain (the chain is L_top(t) units long)
    plan = torch.zeros(rows, T, dtype=torch.int8, device=device)
    offset = 0
    for level in range(max_lod, 0, -1):
        n, span = counts[level - 1], bs ** level
        keep = (~expanded[:, offset: offset + n]).to(torch.int8)  # [rows, n] 1 = still a gist at this level
        plan[:, : n * span] += keep[:, :, None].expand(rows, n, span).reshape(rows, n * span)
        offset += n
    return plan


def sample_variants(B: int, T: int, W: int, num_variants: int, block_size: int = 32, max_lod: int = 2,
                    recent_tokens: int = 0, generator: torch.Generator | None = None, device=None,
                    dedup: bool = True, keys: torch.Tensor | None = None) -> VariantPlans:
    """The recency baseline + `num_variants` compressed plans for each of B sequences of length T.

    Rows are ordered by sample, baseline first: (b0 base, b0 v1, ..., b0 vN, b1 base, ...), minus
    duplicates when dedup. Randomness comes only from `generator` (drawn on its device), so a seeded
    generator gives the same plans on any target device, or from `keys` [B * num_variants, units]
    (see hashed_uniform). dedup=False keeps exactly B * (1 + num_variants) rows: fixed shapes and no
    host sync (dedup's boolean indexing has a data-dependent size), as the training controller wants.
    """
    if W < 1:
        raise ValueError(f"working-context budget W must be >= 1, got {W}")
    if recent_tokens > W:
        raise ValueError(f"recent_tokens={recent_tokens} exceeds the working-context budget W={W}")
    V = 1 + num_variants
    variants = sample_compressed_plans(B * num_variants, T, W, block_size, max_lod, recent_tokens, generator, device,
                                       keys=keys)
    base = baseline_plan(T, W, device)
    plans = torch.cat([base.expand(B, 1, T), variants.view(B, num_variants, T)], dim=1)  # [B, V, T]
    keep = torch.ones(B, V, dtype=torch.bool, device=device)
    if not dedup:
        sample_idx = torch.arange(B, device=device).repeat_interleave(V)
        variant_idx = torch.arange(V, device=device).repeat(B)
        return VariantPlans(plans.reshape(B * V, T), sample_idx, variant_idx)
    if V > 1:
        same = (plans[:, :, None, :] == plans[:, None, :, :]).all(-1)  # [B, V, V]: row i equals row j
        earlier = torch.ones(V, V, dtype=torch.bool, device=device).tril(diagonal=-1)  # j < i
        keep = ~(same & earlier).any(-1)
    sample_idx = torch.arange(B, device=device)[:, None].expand(B, V)
    variant_idx = torch.arange(V, device=device)[None, :].expand(B, V)
    return VariantPlans(plans[keep], sample_idx[keep], variant_idx[keep])


def duplicate_weights(plan: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    """float [R]: 1/k for each of k identical plans among the rows of one sample (rows ordered sample-major,
    `rows_per_sample` each). Weighting a mean by these counts each distinct variant once — deduplication
    that keeps the packed shapes fixed and needs no host sync (the trainer samples with dedup=False)."""
    R, T = plan.shape
    P = plan.view(R // rows_per_sample, rows_per_sample, T)
    same = (P[:, :, None, :] == P[:, None, :, :]).all(-1)  # [B, V, V]: row i equals row j
    return same.sum(-1).reciprocal().view(R).float()
