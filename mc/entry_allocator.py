"""
The focus allocator on the working context's entry list: mc/allocator.py's edits at a cost set by W, not by
the history.

    spans = SpanScores.of_entries(start, lod, scores, bs)
    start, lod, marks, edits, stats = allocate_entries(start, lod, spans, W, cfg, bs, max_lod, limit, marks)

mc/allocator.py states the contract (candidates, hard fit, make-room, best first, hysteresis) on a per-token
plan of the whole history, so one refocus reads every token: 51 ms at 1M tokens against 12 ms at 1K (lab
notebook, 2026-12-07). Everything it reads is a function of the entries (<= W of them) and of the edits (at
most allocator_iterations x allocator_max_replacements), and this module computes it from those alone:

- Entries: (start, lod) long [L] in order, covering [0, T). An entry at LOD l spans bs**l tokens from a
  multiple of bs**l, so it is a node of the block tree, and two nodes are nested or disjoint.
- Scores. The allocator's per-token map is piecewise constant on segments: the entries LensNet scored (a
  score each), cut, for a LensNet with the content match, at the edges of the few blocks whose match is
  non-zero (mc.focus.match_span_scores). Any span [qs, qe) then overlaps a run of consecutive segments:
  its sum is F(qe) - F(qs), F the map's running sum (a prefix sum over whole segments plus the part of the one
  segment x falls in), its max a sparse-table query over the run; O(log) per span, all spans at once
  (SpanScores). The map never changes inside a call, as in mc/allocator.py.
- Candidates at level l: a collapse group is bs consecutive entries at LOD l-1 whose first starts at a
  multiple of bs**l (bs such entries tile exactly that parent); an expand is an entry at LOD l. Both must end
  at or before `limit` (the raw tail starts there).
- Hysteresis: marks long [M, 3] (start, end, kind) replace the per-token state: the spans an edit of the
  previous call touched (+1 expanded, -1 collapsed). Inside a call every edit overrides the marks under its
  span (the per-token state is overwritten token by token), so the blocking marks are the earlier ones
  trimmed by each edit, plus the edit; the returned marks are this call's own (state_from_marks turns them
  into the per-token state, marks_from_state back).

The candidates are listed in the per-token allocator's order (level by level: expands by start, then collapse
groups by start) and chosen by the same mc.allocator.select_edits, so ties break the same way and both
allocators return the same plan, marks and stats on the same input (tests/test_mc_entry_allocator.py).
"""

import torch

from mc.allocator import PlanDoesNotFitError, select_edits


class SpanScores:
    """Mean and max of a score map that is constant on each segment (consecutive spans covering [0, T), in
    order) over any query spans (module docstring)."""

    def __init__(self, seg_start: torch.Tensor, seg_end: torch.Tensor, seg_score: torch.Tensor):
        self.start, self.end = seg_start.long(), seg_end.long()
        self.score = seg_score.double()
        weighted = self.score * (self.end - self.start)
        self.cum = torch.cat([torch.zeros(1, dtype=torch.float64), weighted.cumsum(0)])
        rows = [self.score]  # rows[k][i] = max(score[i : i + 2**k])
        while 2 ** len(rows) <= self.score.numel():
            h = 2 ** (len(rows) - 1)
            rows.append(torch.maximum(rows[-1][:-h], rows[-1][h:]))
        self.table = torch.full((len(rows), max(self.score.numel(), 1)), float("-inf"), dtype=torch.float64)
        for k, row in enumerate(rows):
            self.table[k, : row.numel()] = row

    @classmethod
    def of_entries(cls, start: torch.Tensor, lod: torch.Tensor, scores: torch.Tensor, block_size: int):
        """The map mc.allocator.entry_scores_to_token_map builds: each entry's tokens carry its score."""
        return cls(start, start + block_size ** lod, scores)

    def __call__(self, qs: torch.Tensor, qe: torch.Tensor):
        """(mean, max) float32 [Q] over the spans [qs, qe)."""
        i = torch.searchsorted(self.start, qs, right=True) - 1
        j = torch.searchsorted(self.start, qe)  # the first segment starting at or after the span's end
        inside = self.end[i] >= qe
        mean = torch.where(inside, self.score[i], (self._running_sum(qe) - self._running_sum(qs)) / (qe - qs))
        n = (j - i).clamp(min=1)
        k = torch.log2(n.double()).floor().long()  # exact for these small integers
        top = torch.maximum(self.table[k, i], self.table[k, (j - 2 ** k).clamp(min=0)])
        return mean.float(), torch.where(inside, self.score[i], top).float()

    def _running_sum(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): the map's sum over the tokens [0, x), x in [0, T]."""
        i = (torch.searchsorted(self.start, x, right=True) - 1).clamp(min=0)
        return self.cum[i] + self.score[i] * (x - self.start[i])


def state_from_marks(marks: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The per-token hysteresis state int8 [1, T] of mc/allocator.py (None stays None)."""
    if marks is None:
        return None
    state = torch.zeros(1, T, dtype=torch.int8)
    for s, e, kind in marks.tolist():
        state[0, s:e] = kind
    return state


def marks_from_state(state: torch.Tensor | None) -> torch.Tensor | None:
    """long [M, 3] (start, end, kind): the runs of equal nonzero values of a state int8 [1, T]."""
    if state is None:
        return None
    s = state[0].long()
    edge = torch.ones(s.numel() + 1, dtype=torch.bool)
    edge[1:-1] = s[1:] != s[:-1]
    bounds = edge.nonzero()[:, 0]
    starts, ends = bounds[:-1], bounds[1:]
    kinds = s[starts] if starts.numel() else starts
    keep = kinds != 0
    return torch.stack([starts[keep], ends[keep], kinds[keep]], 1)


def first_changed_start(old_start, old_lod, new_start, new_lod, T: int) -> int:
    """The first token whose level differs between two entry lists of one history (T if none): the start of
    the first entry that differs. Both lists cover [0, T), so the entries before it are the same tokens, and
    a list cannot be a proper prefix of the other."""
    n = min(old_start.numel(), new_start.numel())
    diff = (old_start[:n] != new_start[:n]) | (old_lod[:n] != new_lod[:n])
    return int(new_start[int(diff.int().argmax())]) if bool(diff.any()) else T


def _overlapping(qs, qe, marks, sign):
    """bool [Q]: the span overlaps a mark whose kind has this sign."""
    sel = marks[:, 2] * sign > 0
    ms, me = marks[sel, 0], marks[sel, 1]
    return ((ms[None] < qe[:, None]) & (qs[:, None] < me[None])).any(1)


def _candidates(start, lod, bs, max_lod, limit, spans, marks, thresholds):
    """The candidate edits as mc.allocator's (kind, score, start, span, new_level) tuples, in its order.
    thresholds None: the forced fit (every collapse group, no expands, no hysteresis)."""
    out = []
    is_level = [lod == level for level in range(max_lod + 1)]
    for level in range(1, max_lod + 1):
        span = bs ** level
        if limit // span == 0:
            continue
        if thresholds is not None:
            s = start[is_level[level] & (start + span <= limit)]
            _, best = spans(s, s + span)
            ok = (best >= thresholds[0]) & ~_overlapping(s, s + span, marks, -1)
            out += [(1, v, p, span, level - 1) for p, v in zip(s[ok].tolist(), best[ok].tolist())]
        run = torch.cat([torch.zeros(1, dtype=torch.long), is_level[level - 1].long().cumsum(0)])
        first = start[: max(start.numel() - bs + 1, 0)]
        group = (run[bs:] - run[:-bs] == bs) & (first % span == 0) & (first + span <= limit)
        s = first[group]
        mean, _ = spans(s, s + span)
        ok = torch.ones_like(s, dtype=torch.bool)
        if thresholds is not None:
            ok = (mean <= thresholds[1]) & ~_overlapping(s, s + span, marks, +1)
        out += [(-1, v, p, span, level) for p, v in zip(s[ok].tolist(), mean[ok].tolist())]
    return out


def _ranks(counts: torch.Tensor) -> torch.Tensor:
    """0..c-1 for every count c, concatenated."""
    return torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)


def _apply(start, lod, marks, fresh, edits, bs):
    """Entries and marks after the edits (disjoint spans), O((L + M + edits) log) however many edits (a long
    ingest's hard fit makes thousands). marks: long [M, 3]; fresh: bool [M], the marks of this call. Each
    edit's span replaces the entries and trims the marks under it, and becomes a mark of its own."""
    e = torch.tensor([(s, s + span, kind, level) for kind, _, s, span, level in edits], dtype=torch.long)
    e = e[e[:, 0].argsort()]
    es, ee, ek, el = e.t().contiguous()
    k = (torch.searchsorted(es, start, right=True) - 1).clamp(min=0)
    outside = ~((start >= es[k]) & (start < ee[k]))
    child = bs ** el
    owner = torch.repeat_interleave(torch.arange(e.size(0)), (ee - es) // child)
    born = es[owner] + _ranks((ee - es) // child) * child[owner]
    start, order = torch.cat([start[outside], born]).sort()
    lod = torch.cat([lod[outside], el[owner]])[order]
    parts, source = _trim_marks(marks, es, ee)
    marks = torch.cat([parts, torch.stack([es, ee, ek], 1)])
    fresh = torch.cat([fresh[source], torch.ones(e.size(0), dtype=torch.bool)])
    return start, lod, marks, fresh


def apply_edits(start: torch.Tensor, lod: torch.Tensor, edits, block_size: int):
    """(start', lod'): the entries after edits (mc.allocator's (kind, score, start, span, new_level) tuples)
    whose spans are disjoint."""
    none = torch.zeros(0, 3, dtype=torch.long)
    start, lod, _, _ = _apply(start, lod, none, torch.zeros(0, dtype=torch.bool), edits, block_size)
    return start, lod


def _trim_marks(marks: torch.Tensor, es: torch.Tensor, ee: torch.Tensor):
    """(parts long [K, 3], source long [K]): the parts of marks [M, 3] outside the spans [es, ee) (sorted,
    disjoint), and the mark each part comes from. A mark keeps its parts in the gaps between the spans:
    gap g = [gap_start[g], gap_end[g])."""
    gap_start = torch.cat([torch.tensor([-1]), ee])
    gap_end = torch.cat([es, torch.tensor([2 ** 62])])
    ms, me, mk = marks.t().contiguous()
    first = torch.searchsorted(gap_end, ms, right=True)  # the first gap that ends after the mark starts
    count = (torch.searchsorted(gap_start, me) - first).clamp(min=0)  # ... up to the last that starts before it ends
    mi = torch.repeat_interleave(torch.arange(ms.numel()), count)
    gi = first[mi] + _ranks(count)
    lo, hi = torch.maximum(ms[mi], gap_start[gi]), torch.minimum(me[mi], gap_end[gi])
    kept = lo < hi
    return torch.stack([lo, hi, mk[mi]], 1)[kept], mi[kept]


def overlay_marks(under: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
    """long [K, 3]: the marks of two calls, over's winning where both mark a token (on the per-token states:
    torch.where(over != 0, over, under)). over's spans are disjoint, as a call's marks are."""
    over = over[over[:, 0].argsort()]
    parts, _ = _trim_marks(under, over[:, 0].contiguous(), over[:, 1].contiguous())
    return torch.cat([parts, over])


def allocate_entries(start: torch.Tensor, lod: torch.Tensor, spans: SpanScores, W: int, cfg, block_size: int,
                     max_lod: int, limit: int, marks: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, best_first: bool = False):
    """One call of mc.allocator.allocate on one row's entry list (module docstring). start, lod: long [L]
    covering [0, T); spans: the scores; limit: T - recent_tokens (tokens from there on stay raw); marks: the
    previous call's (None = none). Returns (start', lod', marks' = this call's edits, edits in the order
    applied, stats as mc.allocator.allocate's for one row)."""
    bs, c = block_size, block_size - 1
    start, lod = start.long(), lod.long()
    tail = start + block_size ** lod > limit
    if bool((tail & (lod != 0)).any()):
        raise ValueError(f"the entries from token {limit} on (the recent tokens) must be raw")
    held = torch.zeros(0, 3, dtype=torch.long) if marks is None else marks.long().view(-1, 3)
    fresh = torch.zeros(held.size(0), dtype=torch.bool)
    counts = dict(expands=0, collapses=0, forced=0)
    applied = []
    n = start.numel()
    while n > W:  # 0. the hard fit: the lowest-scored collapse groups, whatever their score and hysteresis
        pick = sorted(_candidates(start, lod, bs, max_lod, limit, spans, held, None), key=lambda x: x[1])
        pick = pick[: -(-(n - W) // c)]
        if not pick:
            raise PlanDoesNotFitError(f"the plan has {n} entries and cannot be collapsed to W={W} (block_size={bs}, "
                                      f"max_lod={max_lod}, the raw tail from token {limit})")
        start, lod, held, fresh = _apply(start, lod, held, fresh, pick, bs)
        applied += pick
        counts["forced"] += len(pick)
        n -= c * len(pick)
    thresholds = (cfg.allocator_expand_threshold, cfg.allocator_collapse_threshold)
    target = min(cfg.allocator_soft_max_length or W, W)
    rounds = cfg.allocator_iterations * (cfg.allocator_max_replacements if best_first else 1)
    iterations = 0
    for _ in range(rounds):  # 1. the greedy iterations
        cands = _candidates(start, lod, bs, max_lod, limit, spans, held, thresholds)
        edits = select_edits(cands, n, target, cfg.allocator_max_replacements, c,
                             cfg.allocator_type == "stochastic_greedy", cfg.allocator_sample_top_k,
                             cfg.allocator_sample_temperature, generator,
                             max_expands=1 if best_first else None) if cands else []
        if not edits:
            break
        start, lod, held, fresh = _apply(start, lod, held, fresh, edits, bs)
        applied += edits
        for e in edits:
            counts["expands" if e[0] > 0 else "collapses"] += 1
            n += c if e[0] > 0 else -c
        iterations += 1
    stats = {k: torch.tensor([v]) for k, v in counts.items()}
    stats.update(iterations=iterations, budget_used=torch.tensor([n / W]))
    return start, lod, held[fresh], applied, stats
