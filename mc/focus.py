"""
One refocus: LensNet scores the current working context, the allocator edits the plan.

    plan, state, info = refocus(lensnet, plan, levels, cfg, W)

This is the step the inference session (mc/session.py) runs at every user turn and every
--mc_infer_refocus_interval tokens, and the step mc_eval's MC-LensNet condition runs once per probe.
Training never calls it: there LensNet only learns (mc/lens_loss.py) from the random variants.

Inputs
  lensnet   mc.lensnet.LensNet, or None for fixed focus (--lensnet_type=none): every score is 0, so
            the allocator makes only the forced collapses that fit the plan into W
  plan      int8 [R, T] over the whole history (0 raw, l >= 1 inside a LOD-l gist; no -1), legal
            (block-aligned) with the last recent_tokens raw
  levels    the tree's levels [LOD0 [R, T, C] (or None if not cached), LOD1, ...] (MegaContextTree.levels)
  cfg       MCConfig: block_size, max_lod, recent_tokens and the --allocator_* knobs
  W         the working-context budget in entries
  state     the hysteresis state returned by the previous refocus (None the first time)
Returns (new_plan int8 [R, T], new_state int8 [R, T], info) with info = the allocator's stats plus
"scores" (the centred scores [R, L] the allocator saw, of the OLD working context), "gist_reference"
([R], the row's mean raw gist score that was subtracted) and "changed" (bool [R]: whether the plan
changed).

Scores are centred on the row's gists before the allocator reads them:
    s'_e = clamp(s_e - mean_{gists g of the row} s_g, -1, 1)
LensNet learns from preferences between variants (mc/lens_loss.py), which fix score DIFFERENCES, not
their level: measured on a CPU MC run (lab notebook, 2026-11-23) it learned "raw beats gist" and
scored every gist below -0.5, so absolute thresholds (--allocator_expand_threshold 0.1) never fired and
its ranking among gists was never used. Centred, a gist is expanded when LensNet rates it
expand_threshold above the row's average gist (same run: MC-LensNet gap recovery 0.68 -> 0.84 with
~1 expansion per item). A fresh LensNet (all 0) and fixed focus (lensnet None) are unchanged by it.
The same LensNet rates raw tokens below the gists, i.e. collapse candidates; the allocator applies a
collapse only in its hard fit or as room for an expand (mc/allocator.py), so a plan within W (a short
chat, all raw) is never coarsened by those scores.

LensNet sees the working context the model currently reads, so a gist it wants refined must already
be in it; expanding a LOD2 gist to raw takes two refocuses (LOD2 -> LOD1 children inherit the score
inside one allocator call, see mc/allocator.py, so with allocator_iterations >= 2 it happens in one).
"""

import torch

from mc.allocator import allocate
from mc.working_context import build_working_context


def first_changed_token(old_plan: torch.Tensor, new_plan: torch.Tensor) -> torch.Tensor:
    """long [R]: the first token position where the plans differ (T where they are equal). Every WC
    entry whose span starts before it is unchanged, so a KV cache is valid up to there."""
    R, T = new_plan.shape
    diff = old_plan != new_plan
    pos = torch.arange(T, device=new_plan.device).expand(R, T)
    return torch.where(diff, pos, T).min(1).values


@torch.no_grad()
def refocus(lensnet, plan: torch.Tensor, levels, cfg, W: int, state: torch.Tensor | None = None,
            generator: torch.Generator | None = None, recent_tokens: int | None = None, wc=None):
    """LensNet scores + allocator edits (module docstring). recent_tokens overrides cfg.recent_tokens
    (mc_eval protects its whole raw window). wc: the plan's WorkingContext when the caller already has it
    (right-aligned or unpadded; the inference session builds its entries from token ids without a LOD0
    table); levels is then not read."""
    if plan.ndim != 2:
        raise ValueError(f"plan must be [rows, T], got shape {tuple(plan.shape)}")
    recent = cfg.recent_tokens if recent_tokens is None else recent_tokens
    if wc is None:
        wc = build_working_context(plan, levels, cfg.block_size, align="right")
    if lensnet is None:
        scores = torch.zeros(wc.valid.shape, dtype=torch.float32, device=plan.device)
    else:
        ref = next(lensnet.parameters())
        scores = lensnet(embeddings=wc.embeddings.to(ref.dtype), lod=wc.lod, span_start=wc.span_start,
                         span_len=wc.span_len, valid=wc.valid).float()
    gist = (wc.valid & (wc.lod >= 1)).float()
    reference = (scores * gist).sum(1) / gist.sum(1).clamp(min=1.0)  # rows without gists: 0
    scores = (scores - reference[:, None]).clamp(-1.0, 1.0) * wc.valid
    # the allocator's edit selection runs on the CPU (a short loop over <= max_replacements edits)
    new_plan, new_state, stats = allocate(plan.cpu(), scores.cpu(), W, cfg, cfg.block_size, cfg.max_lod, recent,
                                          state=None if state is None else state.cpu(), generator=generator,
                                          align="right")
    new_plan, new_state = new_plan.to(plan.device), new_state.to(plan.device)
    info = dict(stats)
    info["scores"] = scores.detach()
    info["gist_reference"] = reference.detach()
    info["changed"] = (new_plan != plan).any(1)
    return new_plan, new_state, info
