"""
The focus allocator: LensNet scores -> legal, block-aligned expand/collapse edits of a plan under W.
Contract: detail is only ever removed when the budget needs it (step 0's hard fit, or room for an
expand in step 1); a plan within budget is refined, never coarsened.

Input: a plan int8 [rows, T] covering the whole history (no -1; see mc/working_context.py), one
score in [-1, 1] per WC entry (+ = wants more detail, - = can be coarser), the budget W, and the
--allocator_* knobs of MCConfig. Output: a new legal plan, the hysteresis state, and stats.

Edits (bs = block_size, c = bs - 1 entries per edit):
- expand:   a LOD-l gist (l >= 1) -> its bs children at LOD l-1: +c entries. Score = the entry's (the
            map's max over the span: the same on a map built from entry scores, and the best child's
            when the map scores each child itself, as LensNet's content match does, mc/focus.py).
- collapse: bs sibling entries at LOD l-1 that tile an aligned parent span [j bs**l, (j+1) bs**l),
            l <= max_lod -> one LOD-l gist: -c entries. Score = mean of the bs members (equal spans,
            so it is the mean of the per-token score map over the span).
Both write one aligned span of the per-token map, so block alignment and full coverage hold by
construction. Spans that reach into the last R = recent_tokens tokens are never candidates: that
tail stays raw (a plan that is not raw there is refused).

Scores live on a per-token map for the whole call (entry_scores_to_token_map): the children of an
expanded gist inherit its score, so a strongly positive LOD2 gist can be refined further in the next
iteration (LOD2 -> LOD1 -> raw), and a collapsed group carries its members' mean.

One call:
0. Hard fit. If a row has more than W entries (e.g. the history grew since the last refocus),
   collapse its lowest-scored collapse groups, whatever their score and hysteresis, until it fits
   (PlanDoesNotFitError, a ValueError, if even the fully collapsed covering does not fit). Counted in stats["forced"].
1. `allocator_iterations` times, per row: candidates are expand entries with score >= expand_threshold
   and collapse groups with score <= collapse_threshold that the hysteresis state allows (candidates
   are taken from the plan at the start of the iteration). Only expands are chosen on their own, at most
   `allocator_max_replacements` edits in all, in priority order (greedy: highest score first;
   stochastic_greedy: one draw at a time among the top-k remaining expands by score,
   softmax(score / temperature), from `generator`; expands score >= expand_threshold, so with a
   threshold >= 0 this is the largest |score|, and with a negative one a low score stays last); an expand whose span overlaps an edit already
   applied this iteration is skipped.
   Budget: the target S = allocator_soft_max_length (0 = W), capped at W. An expand is applied only if
   entries + c <= S. Collapse-to-make-room rule: if it does not fit, the fewest lowest-scored collapse
   candidates that overlap neither it nor an applied edit and make it fit (one, unless the row is above
   S) are applied first, then the expand. One swap is always worth it: the expand scores >=
   expand_threshold, the collapse <= collapse_threshold, so it gains at least the threshold gap. If no
   room can be made (no such collapses, or max_replacements would be passed) neither is applied.
   Collapses never happen on their own: a row within budget loses no detail, whatever its scores (a
   history that fits W stays as it is; a trained LensNet that rates raw tokens below every gist would
   otherwise compress a short chat, and the model would no longer be the plain GPT on it). The loop
   stops early when an iteration makes no edit.
   Entries therefore never exceed W (after step 0) and never grow past S through expands.
2. Hysteresis: state is int8 [rows, T_state] per token: +1 = the entry covering it was just expanded,
   -1 = just collapsed, 0 = untouched. A collapse group containing a +1 token and an expand of a gist
   containing a -1 token are not candidates. The returned state marks only the edits of this call, so
   an edit can't be reversed in the same call or the next one, and can be from the one after. A state
   shorter than T (the history grew) is padded with zeros.

Selection is a short Python loop per row over at most max_replacements edits (candidate extraction,
scores and the state are tensor ops over all rows); the allocator runs at refocus time, not per token.
Every call reads the whole plan (O(T)); mc/entry_allocator.py makes the same edits from the entry list
(O(W)), which the inference session's refocus uses.
"""

import torch

from mc.working_context import check_plan, entry_starts


class PlanDoesNotFitError(ValueError):
    """Even the most collapsed covering of the history has more than W entries (the history outgrew W)."""


def entry_scores_to_token_map(plan: torch.Tensor, scores: torch.Tensor, block_size: int, max_lod: int | None = None,
                              align: str = "right", check: bool = True) -> torch.Tensor:
    """float [R, T]: every token gets the score of the WC entry covering it (0 outside the WC).
    scores: [R, L] one per entry in entry order, padded to L >= entries per row, aligned like
    build_working_context's slots ("right": a row's last entry is in slot L-1; "left": first in slot 0).
    check=False skips the entry-count check (a host sync; the training step knows its counts)."""
    if align not in ("right", "left"):
        raise ValueError(f"align must be 'right' or 'left', got {align!r}")
    if scores.ndim != 2 or scores.size(0) != plan.size(0):
        raise ValueError(f"scores must be [rows={plan.size(0)}, L], got {tuple(scores.shape)}")
    starts = entry_starts(plan, block_size, max_level=max_lod)
    counts = starts.sum(1)
    L = scores.size(1)
    if check and plan.numel() and int(counts.max()) > L:
        raise ValueError(f"a plan row has {int(counts.max())} entries but scores hold only {L} per row")
    rank = (starts.long().cumsum(1) - 1).clamp(min=0)
    slot = rank + (L - counts)[:, None] if align == "right" else rank
    if L == 0:
        return torch.zeros(plan.shape, device=plan.device)
    out = scores.float().gather(1, slot.clamp(0, L - 1))
    return torch.where(plan >= 0, out, 0.0)


def token_map_to_entry_scores(plan: torch.Tensor, token_map: torch.Tensor, block_size: int,
                              max_lod: int | None = None) -> torch.Tensor:
    """float [R, L] left-aligned (L = most entries in a row, padding 0): the map's value at each entry's
    first token. The inverse of entry_scores_to_token_map(..., align="left") on a constant-per-entry map."""
    starts = entry_starts(plan, block_size, max_level=max_lod)
    counts = starts.sum(1)
    L = int(counts.max()) if plan.numel() else 0
    R, T = plan.shape
    rank = torch.where(starts, starts.long().cumsum(1) - 1, L)
    out = torch.zeros(R, L + 1, dtype=token_map.dtype, device=plan.device)
    return out.scatter_(1, rank, torch.where(starts, token_map, 0))[:, :L]


def _unit_view(x: torch.Tensor, span: int, n: int) -> torch.Tensor:
    return x[:, : n * span].reshape(x.size(0), n, span)


def _candidates(plan, score_map, block, bs, max_lod, limit, thresholds):
    """All expand/collapse candidates of every row as lists of (kind, score, start, span, new_level).
    limit: tokens [limit, T) are untouchable (the raw tail). thresholds: (expand_t, collapse_t) or None
    (forced fit: every collapse group, no expands). block: int8 hysteresis map or None."""
    lvl = plan  # int8: one byte per token read, the unit views below run over the whole history
    rows, dev = plan.size(0), plan.device
    kinds, scores, starts, spans, new_levels, valid = [], [], [], [], [], []
    for level in range(1, max_lod + 1):
        span = bs ** level
        n = limit // span  # complete aligned units before the tail
        if n == 0:
            continue
        lv = _unit_view(lvl, span, n)
        sc = _unit_view(score_map, span, n)
        unit_start = torch.arange(n, device=plan.device) * span
        # collapse: every token of the unit at level-1 -> bs siblings tile it
        col = (lv == level - 1).all(-1)
        col_score = sc.mean(-1)
        if block is not None:
            col &= ~(_unit_view(block, span, n) > 0).any(-1)
        if thresholds is not None:
            col &= col_score <= thresholds[1]
            # expand: the unit is one LOD-level gist
            exp = lv[:, :, 0] == level
            exp_score = sc.amax(-1)  # the entry's score; on a map with a content match, its best child's
            exp &= exp_score >= thresholds[0]
            if block is not None:
                exp &= ~(_unit_view(block, span, n) < 0).any(-1)
            kinds.append(torch.ones(rows, n, dtype=torch.long, device=dev))
            scores.append(exp_score)
            starts.append(unit_start.expand(rows, n))
            spans.append(torch.full((rows, n), span, device=dev))
            new_levels.append(torch.full((rows, n), level - 1, device=dev))
            valid.append(exp)
        kinds.append(-torch.ones(rows, n, dtype=torch.long, device=dev))
        scores.append(col_score)
        starts.append(unit_start.expand(rows, n))
        spans.append(torch.full((rows, n), span, device=dev))
        new_levels.append(torch.full((rows, n), level, device=dev))
        valid.append(col)
    out = [[] for _ in range(rows)]
    if not kinds:
        return out
    cat = [torch.cat(x, 1) for x in (kinds, scores, starts, spans, new_levels, valid)]
    for r in range(rows):
        v = cat[5][r]
        if v.any():
            cols = [x[r][v].tolist() for x in cat[:5]]
            out[r] = list(zip(*cols))
    return out


def _overlaps(touched, start, span):
    return any(s < start + span and start < e for s, e in touched)


def _make_room(room, touched, span, n, target, c, k_max):
    """The fewest lowest-scored collapses from `room` (sorted lowest score first) that overlap neither
    `touched` nor `span` and bring n + c (the expand) within target; None if that takes more than k_max
    or there are not enough. Collapse groups are disjoint (one level each), so picks never overlap."""
    need = -(-(n + c - target) // c)
    if need > k_max:
        return None
    picks = [x for x in room if not _overlaps(touched, x[2], x[3]) and not _overlaps([span], x[2], x[3])][:need]
    return picks if len(picks) == need else None


def select_edits(cands, n, target, max_edits, c, stochastic, top_k, temperature, generator, max_expands=None):
    """Greedy (or sampled) choice of edits for one row; returns the chosen candidates in order. Only
    expands are ranked; collapses are applied only as the room an expand needs (module docstring).
    max_expands: stop after that many expands (None: only max_edits bounds them)."""
    remaining = sorted((x for x in cands if x[0] > 0), key=lambda x: -x[1])  # priority: score, stable
    room = sorted((x for x in cands if x[0] < 0), key=lambda x: x[1])  # make-room pool: lowest score first
    chosen, touched = [], []
    while remaining and len(chosen) < max_edits and (max_expands is None or max_expands > 0):
        if stochastic and temperature > 0 and len(remaining) > 1:
            k = min(top_k, len(remaining))
            w = torch.tensor([x[1] for x in remaining[:k]], dtype=torch.float64) / temperature
            i = int(torch.multinomial(torch.softmax(w, 0), 1, generator=generator))
        else:
            i = 0
        _, _, start, span, _ = cand = remaining.pop(i)
        if _overlaps(touched, start, span):
            continue
        picks = []
        if n + c > target:  # collapse first to make room (all the needed collapses, or nothing)
            picks = _make_room(room, touched, (start, start + span), n, target, c, max_edits - len(chosen) - 1)
            if picks is None:
                continue
        for x in picks + [cand]:
            room = [y for y in room if y is not x]
            chosen.append(x)
            touched.append((x[2], x[2] + x[3]))
            n += c if x[0] > 0 else -c
        max_expands = None if max_expands is None else max_expands - 1
    return chosen


def _apply(plan, state, row, edits):
    for kind, _, start, span, new_level in edits:
        plan[row, start: start + span] = new_level
        state[row, start: start + span] = kind


def allocate(plan: torch.Tensor, scores: torch.Tensor, W: int, cfg, block_size: int, max_lod: int,
             recent_tokens: int, state: torch.Tensor | None = None, generator: torch.Generator | None = None,
             align: str = "right", scores_are_token_map: bool = False, best_first: bool = False):
    """One refocus (see the module docstring). Returns (new_plan int8 [R, T], new_state int8 [R, T], stats).

    plan: int8 [R, T] legal, full coverage, last recent_tokens raw. scores: [R, L] per entry (aligned as
    `align`), or a per-token float map [R, T] when scores_are_token_map. cfg: MCConfig (allocator_* knobs).
    state: the hysteresis state returned by the previous call (None = no history).
    generator: a CPU torch.Generator for stochastic_greedy (None = the global RNG).
    stats: long [R] "expands", "collapses", "forced", float [R] "budget_used" (entries / W), int
    "iterations" (iterations that made at least one edit).
    best_first: one expand (with the collapses that make its room) per iteration, for up to
    allocator_iterations x allocator_max_replacements iterations, so the children of an expanded gist
    compete with every other candidate at once (mc/focus.py says why)."""
    if plan.ndim != 2:
        raise ValueError(f"plan must be [rows, T], got shape {tuple(plan.shape)}")
    R, T = plan.shape
    bs = block_size
    check_plan(plan, bs, max_lod=max_lod)
    if (plan < 0).any():
        raise ValueError("the allocator needs a plan covering the whole history (no -1)")
    if W < 1:
        raise ValueError(f"W must be >= 1, got {W}")
    limit = max(T - recent_tokens, 0)
    if (plan[:, limit:] != 0).any():
        raise ValueError(f"the last recent_tokens={recent_tokens} tokens of the plan must be raw")
    score_map = (scores.float() if scores_are_token_map
                 else entry_scores_to_token_map(plan, scores, bs, max_lod=max_lod, align=align)).clone()
    if score_map.shape != plan.shape:
        raise ValueError(f"token score map must be {tuple(plan.shape)}, got {tuple(score_map.shape)}")
    prev = torch.zeros(R, T, dtype=torch.int8, device=plan.device)
    if state is not None:
        if state.ndim != 2 or state.size(0) != R or state.size(1) > T:
            raise ValueError(f"state must be [rows={R}, <= T={T}], got {tuple(state.shape)}")
        prev[:, : state.size(1)] = state
    plan = plan.clone()
    new_state = torch.zeros_like(prev)
    c = bs - 1
    target = min(cfg.allocator_soft_max_length or W, W)
    stochastic = cfg.allocator_type == "stochastic_greedy"
    expands = torch.zeros(R, dtype=torch.long)
    collapses = torch.zeros(R, dtype=torch.long)
    forced = torch.zeros(R, dtype=torch.long)

    # 0. hard fit to W. Entry counts are read once and then tracked: every edit moves a row by c entries.
    n = entry_starts(plan, bs, max_level=max_lod).sum(1).tolist()
    while True:
        over = [r for r in range(R) if n[r] > W]
        if not over:
            break
        cands = _candidates(plan, score_map, None, bs, max_lod, limit, None)
        progress = False
        for r in over:
            need = -(-(n[r] - W) // c)
            pick = sorted(cands[r], key=lambda x: x[1])[:need]  # disjoint: one round's groups never overlap
            _apply(plan, new_state, r, pick)
            forced[r] += len(pick)
            n[r] -= c * len(pick)
            progress |= bool(pick)
        if not progress:
            r = over[0]
            raise PlanDoesNotFitError(f"plan row {r} has {n[r]} entries and cannot be collapsed to W={W} "
                             f"(block_size={bs}, max_lod={max_lod}, recent_tokens={recent_tokens})")

    # 1. greedy iterations
    thresholds = (cfg.allocator_expand_threshold, cfg.allocator_collapse_threshold)
    iterations = 0
    rounds = cfg.allocator_iterations * (cfg.allocator_max_replacements if best_first else 1)
    for _ in range(rounds):
        block = torch.where(new_state != 0, new_state, prev)
        cands = _candidates(plan, score_map, block, bs, max_lod, limit, thresholds)
        made = False
        for r in range(R):
            if not cands[r]:
                continue
            edits = select_edits(cands[r], n[r], target, cfg.allocator_max_replacements, c, stochastic,
                                cfg.allocator_sample_top_k, cfg.allocator_sample_temperature, generator,
                                max_expands=1 if best_first else None)
            _apply(plan, new_state, r, edits)
            expands[r] += sum(1 for e in edits if e[0] > 0)
            collapses[r] += sum(1 for e in edits if e[0] < 0)
            n[r] += c * sum(1 if e[0] > 0 else -1 for e in edits)
            made |= bool(edits)
        if not made:
            break
        iterations += 1
    stats = {"expands": expands, "collapses": collapses, "forced": forced, "iterations": iterations,
             "budget_used": torch.tensor(n, dtype=torch.float) / W}
    return plan, new_state, stats
