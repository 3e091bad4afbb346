"""
One refocus: LensNet scores the current working context, the allocator edits the plan.

    plan, state, info = refocus(lensnet, plan, levels, cfg, W)
    start, lod, marks, edits, info = refocus_entries(lensnet, wc, cfg, W, limit, marks)   # one row, O(W)

This is the step the inference session (mc/infer/session.py) runs at every user turn and every
--mc_infer_refocus_interval tokens, and the step mc_eval's MC-LensNet condition runs once per probe.
Training never calls it: there LensNet only learns (mc/train/lens_loss.py) from the random variants.
refocus_entries is the same step on one row's entry list (mc/entry_allocator.py), with the same edits: the
session's refocus, at an allocator cost that does not grow with the history (the content match's block scores
are made from every block's keys, mc/keymatch.py; the allocator reads only the few blocks they single out).

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
LensNet learns from preferences between variants (mc/train/lens_loss.py), which fix score DIFFERENCES, not
their level: measured on a CPU MC run (lab notebook, 2026-11-23) it learned "raw beats gist" and
scored every gist below -0.5, so absolute thresholds (--allocator_expand_threshold 0.1) never fired and
its ranking among gists was never used. Centred, a gist is expanded when LensNet rates it
expand_threshold above the row's average gist (same run: MC-LensNet gap recovery 0.68 -> 0.84 with
~1 expansion per item). A fresh LensNet (all 0) and fixed focus (lensnet None) are unchanged by it.
The same LensNet rates raw tokens below the gists, i.e. collapse candidates; the allocator applies a
collapse only in its hard fit or as room for an expand (mc/allocator.py), so a plan within W (a short
chat, all raw) is never coarsened by those scores.

LensNet sees the working context the model currently reads, so a gist it wants refined must already
be in it; expanding a LOD2 gist to raw takes two allocator iterations (LOD2 -> LOD1 children inherit the
score inside one allocator call, see mc/allocator.py). The edits are spent best first (allocate's
best_first: one expand, with the collapses that make its room, per iteration, for up to
allocator_iterations x allocator_max_replacements iterations), so the children of the best gist compete
with every other candidate at once. Batched (up to
max_replacements edits per iteration), the first iteration spent the whole budget on the best gists and
the next-best ones, and the best gist's child that held the needle found no room in the second (measured
on the recall checkpoint at 16W: the needle's LOD2 gist scored first in 5 of 8 probes and none of those
needles was opened; one edit at a time opened all 5).

A LensNet with the content match (--lensnet_match=1, mc/lensnet.py) needs match_z, the keymatch block
scores of the history [R, n_blocks] (mc.keymatch.tail_block_scores). Its score tanh(net_e + g m_e) has
the match outside the network, so the allocator gets a per-token map in which each token of an entry
carries tanh(net_e + g m_(its block)): the entry's own score is the map's max over its span (what the
allocator reads for an expand), and after an expand the children are told apart by their own match,
so LOD2 -> LOD1 -> raw lands on the block that matches, not on an arbitrary child.
"""

import dataclasses

import torch

from mc.allocator import PlanDoesNotFitError, allocate, entry_scores_to_token_map
from mc.entry_allocator import SpanScores, allocate_entries, overlay_marks
from mc.keymatch import entry_match, match_strength, token_match
from mc.working_context import build_working_context


def first_changed_token(old_plan: torch.Tensor, new_plan: torch.Tensor) -> torch.Tensor:
    """long [R]: the first token position where the plans differ (T where they are equal). Every WC
    entry whose span starts before it is unchanged, so a KV cache is valid up to there."""
    R, T = new_plan.shape
    diff = old_plan != new_plan
    pos = torch.arange(T, device=new_plan.device).expand(R, T)
    return torch.where(diff, pos, T).min(1).values


def make_room(plan: torch.Tensor, token_scores: torch.Tensor, W: int, room: int, cfg, recent_tokens: int):
    """(plan', freed, forced): plan [R, T] brought to <= W - room entries by the allocator's hard fit
    (the lowest-scored collapse groups of the per-token scores first), with less room when even the
    coarsest covering leaves less (halved until it fits; 0 = nothing to do). freed: int8 [R, T], -1 on
    the tokens collapsed (the hysteresis mark); forced: long [R] collapses made."""
    hard = dataclasses.replace(cfg, allocator_expand_threshold=2.0, allocator_collapse_threshold=-2.0)
    room = min(room, W - 1)  # a working context keeps at least one entry
    while room > 0:
        try:
            fitted, freed, stats = allocate(plan, token_scores, W - room, hard, cfg.block_size, cfg.max_lod,
                                            recent_tokens, scores_are_token_map=True)
            return fitted, freed, stats["forced"]
        except PlanDoesNotFitError:
            room //= 2
    return plan, torch.zeros(plan.shape, dtype=torch.int8), torch.zeros(plan.size(0), dtype=torch.long)


def lens_scores(lensnet, wc, cfg, match_z: torch.Tensor | None = None):
    """(scores, reference, logits, match): LensNet's scores of the working context wc, centred on the row's
    gists (module docstring), [R, L] float; reference [R]; logits and match only for a content-matching
    LensNet (else None). lensnet None: every score 0."""
    logits = match = None
    if lensnet is None:
        scores = torch.zeros(wc.valid.shape, dtype=torch.float32, device=wc.valid.device)
    else:
        ref = next(lensnet.parameters())
        inputs = dict(embeddings=wc.embeddings.to(ref.dtype), lod=wc.lod, span_start=wc.span_start,
                      span_len=wc.span_len, valid=wc.valid)
        if getattr(lensnet, "match", False):
            if match_z is None:
                raise ValueError("this LensNet reads the content match (--lensnet_match=1): refocus needs match_z, "
                                 "the history's block scores (mc.keymatch.tail_block_scores)")
            match = entry_match(match_z, wc.span_start, wc.lod, wc.valid, cfg.block_size, cfg.max_lod)
            logits = lensnet.logits(**inputs, match=match).float()
            scores = torch.tanh(logits) * wc.valid
        else:
            scores = lensnet(**inputs).float()
    gist = (wc.valid & (wc.lod >= 1)).float()
    reference = (scores * gist).sum(1) / gist.sum(1).clamp(min=1.0)  # rows without gists: 0
    return (scores - reference[:, None]).clamp(-1.0, 1.0) * wc.valid, reference, logits, match


@torch.no_grad()
def refocus(lensnet, plan: torch.Tensor, levels, cfg, W: int, state: torch.Tensor | None = None,
            generator: torch.Generator | None = None, recent_tokens: int | None = None, wc=None,
            match_z: torch.Tensor | None = None, room: int = 0):
    """LensNet scores + allocator edits (module docstring). recent_tokens overrides cfg.recent_tokens
    (mc_eval protects its whole raw window). wc: the plan's WorkingContext when the caller already has it
    (right-aligned or unpadded; the inference session builds its entries from token ids without a LOD0
    table); levels is then not read. match_z: the block scores a content-matching LensNet reads (module
    docstring). room: entries to free first (the allocator's hard fit to W - room, lowest-scored groups
    collapsed first; the best-first edits may reopen them), so a full working context can still open what the
    scores ask for (the inference session's refocus: its WC is at budget whenever the history is longer
    than W). Fewer if even the coarsest covering leaves less."""
    if plan.ndim != 2:
        raise ValueError(f"plan must be [rows, T], got shape {tuple(plan.shape)}")
    recent = cfg.recent_tokens if recent_tokens is None else recent_tokens
    if wc is None:
        wc = build_working_context(plan, levels, cfg.block_size, align="right")
    scores, reference, logits, match = lens_scores(lensnet, wc, cfg, match_z)
    if match is not None:  # each token: its entry's network score + its own block's match
        g = float(lensnet.match_gain)
        net = entry_scores_to_token_map(plan, (logits - g * match) * wc.valid, cfg.block_size, cfg.max_lod)
        own = token_match(match_z, plan.size(1), cfg.block_size).to(net.device)
        alloc_scores = (torch.tanh(net + g * own) - reference[:, None]).clamp(-1.0, 1.0)
    else:  # one score per token, so the map still holds after the room-making collapses
        alloc_scores = entry_scores_to_token_map(plan, scores, cfg.block_size, cfg.max_lod)
    alloc_scores = alloc_scores.cpu()
    fitted, freed, forced = make_room(plan.cpu(), alloc_scores, W, room, cfg, recent)
    # best first (module docstring); the allocator's selection runs on the CPU (a short loop over the edits).
    # What make_room collapsed may be reopened: with few collapse groups to choose from, the room can take
    # the very block the question asks about (measured on a 50K-token session), and it must come back first.
    new_plan, new_state, stats = allocate(fitted, alloc_scores, W, cfg, cfg.block_size, cfg.max_lod, recent,
                                          state=None if state is None else state.cpu(), generator=generator,
                                          align="right", scores_are_token_map=True, best_first=True)
    new_state = torch.where(new_state != 0, new_state, freed)  # this call's edits: the room and the allocator's
    stats["forced"] = stats["forced"] + forced
    new_plan, new_state = new_plan.to(plan.device), new_state.to(plan.device)
    info = dict(stats)
    info["scores"] = scores.detach()
    info["gist_reference"] = reference.detach()
    info["changed"] = (new_plan != plan).any(1)
    return new_plan, new_state, info


def make_room_entries(start, lod, spans: SpanScores, W: int, room: int, cfg, limit: int):
    """make_room on an entry list (mc/entry_allocator.py): (start', lod', freed marks, edits, forced)."""
    hard = dataclasses.replace(cfg, allocator_expand_threshold=2.0, allocator_collapse_threshold=-2.0)
    room = min(room, W - 1)  # a working context keeps at least one entry
    while room > 0:
        try:
            start2, lod2, freed, edits, stats = allocate_entries(start, lod, spans, W - room, hard, cfg.block_size,
                                                                 cfg.max_lod, limit)
            return start2, lod2, freed, edits, int(stats["forced"][0])
        except PlanDoesNotFitError:
            room //= 2
    return start, lod, torch.zeros(0, 3, dtype=torch.long), [], 0


def match_span_scores(start, lod, logits, match, match_z, gain: float, reference, block_size: int) -> SpanScores:
    """The per-token map refocus gives the allocator for a content-matching LensNet (module docstring), as
    segments for the entry allocator. start, lod, logits, match: one row's entries [L]; match_z [1, n_blocks];
    reference: the row's gist reference (0-d). A token of entry e in block b carries
    clamp(tanh(net_e + g m_b) - reference, -1, 1), net_e = logits_e - g match_e; m_b = 0 except in the few
    blocks the question singles out, so the map is constant on the entries cut at those blocks' edges:
    O(L + hits) segments, whatever the history's length. Same arithmetic as refocus, token for token."""
    bs = block_size
    T = int(start[-1] + bs ** lod[-1])
    m = match_strength(match_z[0].float())
    hit = m.nonzero()[:, 0]
    cuts = torch.cat([start, hit * bs, (hit + 1) * bs]).unique()
    cuts = cuts[cuts < T]
    entry = torch.searchsorted(start, cuts, right=True) - 1
    block = cuts // bs
    own = torch.cat([m, m.new_zeros(1)])[block.clamp(max=m.numel())]  # 0 past the scored blocks
    net = logits[entry] - gain * match[entry]
    score = (torch.tanh(net + gain * own) - reference).clamp(-1.0, 1.0)
    return SpanScores(cuts, torch.cat([cuts[1:], torch.tensor([T])]), score)


@torch.no_grad()
def refocus_entries(lensnet, wc, cfg, W: int, limit: int, marks: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, match_z: torch.Tensor | None = None, room: int = 0):
    """refocus for one row given as its working context (unpadded, [1, L]) instead of a per-token plan, at a
    cost set by W, not by the history (mc/entry_allocator.py): the same edits, hysteresis and stats as
    refocus(..., match_z, room) with the same LensNet (or fixed focus, None). limit: the first token of the
    raw tail; marks: the previous call's hysteresis (entry_allocator). Returns (start', lod', marks', edits in
    the order applied, info), info as refocus's."""
    scores, reference, logits, match = lens_scores(lensnet, wc, cfg, match_z)
    start, lod = wc.span_start[0].cpu(), wc.lod[0].cpu()
    if match is not None:
        spans = match_span_scores(start, lod, logits[0].cpu(), match[0].cpu(), match_z.cpu(),
                                  float(lensnet.match_gain), reference[0].cpu(), cfg.block_size)
    else:
        spans = SpanScores.of_entries(start, lod, scores[0].cpu(), cfg.block_size)
    start, lod, freed, made_room, forced = make_room_entries(start, lod, spans, W, room, cfg, limit)
    # best first; what make_room collapsed may be reopened (refocus says why)
    start, lod, marks, edits, stats = allocate_entries(start, lod, spans, W, cfg, cfg.block_size, cfg.max_lod,
                                                       limit, marks, generator, best_first=True)
    stats["forced"] = stats["forced"] + forced
    info = dict(stats, scores=scores.detach(), gist_reference=reference.detach(),
                changed=torch.tensor([bool(made_room or edits)]))
    return start, lod, overlay_marks(freed, marks), made_room + edits, info
