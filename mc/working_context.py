"""
The working context (WC) as padded tensors, built from plans; invariants; next-token targets.

Plan (the representation every MC module exchanges): int8 [R, T] for a history of T tokens,
plan[r, t] = level of detail of token t in row r: 0 raw token, l >= 1 inside a LOD-l gist,
-1 not in the WC. Legal plans: -1 only as a prefix (a WC covers a suffix [start, T) of the history;
start = 0 for every compressed variant, T - W for the recency baseline), and a level l >= 1 only on
whole aligned spans [j * bs**l, (j+1) * bs**l). A per-token map is one byte per token, covers
partial blocks (the baseline's start need not be block-aligned), and turns edits into slice
assignments: expanding a gist = writing its children's level over its span.

Entries. An entry starts at token t iff plan[t] = l >= 0 and t % bs**l == 0; it spans bs**l tokens.
WorkingContext holds, per row and entry slot i (padded to the longest row, right-aligned by default
so every row's newest entry sits in the last slot, as the packed GPT forward wants):
    embeddings [R, L, C]  LOD0 row for raw tokens, the LOD-l gist for gists (gradients flow)
    positions  [R, L]     float: the global position of the entry = last token of its span
                          (s + n - 1; measured better than the block centre)
    lod, span_start, span_len [R, L] long;  valid [R, L] bool (False = padding: lod -1, len 0)
    sample_idx [R]        which history (row of the tree) the plan belongs to

Targets: an entry spanning [s, s+n) predicts the token right after it, tokens[s+n] (a gist of block
[s, s+32) predicts x[s+32], a raw token at t predicts x[t+1]), -1 when s+n is past the end.
"""

import dataclasses
from dataclasses import dataclass
from functools import reduce

import torch


@dataclass
class WorkingContext:
    embeddings: torch.Tensor
    positions: torch.Tensor
    lod: torch.Tensor
    span_start: torch.Tensor
    span_len: torch.Tensor
    valid: torch.Tensor
    sample_idx: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(1)


def _spans(block_size: int, max_level: int, device) -> torch.Tensor:
    # built on the device (no host -> device copy, which blocks the training step on CUDA)
    return block_size ** torch.arange(max_level + 1, dtype=torch.long, device=device)


def entry_starts(plan: torch.Tensor, block_size: int, max_level: int | None = None) -> torch.Tensor:
    """bool [R, T]: True where an entry begins: every raw token, and a LOD-l token at a multiple of bs**l.
    max_level: the highest level the plan may hold (saves a host sync on plan.max(); default: read it from
    the plan). A level-l start can only sit at a multiple of bs**l, so each level reads the strided view
    of those positions: one byte compare per token plus T / bs**l per level (the inference session runs
    this at every refocus over the whole history)."""
    if max_level is None:
        max_level = max(int(plan.max()), 0) if plan.numel() else 0
    starts = plan == 0
    for level in range(1, max_level + 1):
        span = block_size ** level
        starts[:, ::span] |= plan[:, ::span] == level
    return starts


def entry_counts(plan: torch.Tensor, block_size: int) -> torch.Tensor:
    """long [R]: number of WC entries each plan row produces."""
    return entry_starts(plan, block_size).sum(1)


def check_plan(plan: torch.Tensor, block_size: int, max_lod: int | None = None):
    """Raise ValueError unless every row is a legal plan (see the module docstring)."""
    if plan.ndim != 2:
        raise ValueError(f"a plan must be [rows, T], got shape {tuple(plan.shape)}")
    R, T = plan.shape
    lvl = plan  # compared in its own dtype (int8 in the session: 1 byte per history token read)
    top = max_lod if max_lod is not None else (int(lvl.max()) if lvl.numel() else 0)
    if lvl.numel() and (int(lvl.min()) < -1 or int(lvl.max()) > top):
        raise ValueError(f"plan levels must lie in [-1, {top}], found [{int(lvl.min())}, {int(lvl.max())}]")
    out = lvl < 0
    bad = out[:, 1:] & ~out[:, :-1]
    if bad.any():
        r, t = bad.nonzero()[0].tolist()
        raise ValueError(f"plan row {r}: token {t + 1} is outside the WC after token {t} inside it; "
                         "-1 (not in the WC) may only be a prefix")
    for level in range(1, top + 1):
        span = block_size ** level
        n = T // span
        inside = lvl[:, : n * span] == level
        per_unit = inside.reshape(R, n, span).sum(-1)
        partial = (per_unit > 0) & (per_unit < span)
        if partial.any() or (lvl[:, n * span:] == level).any():
            rows = (partial.any(1) | (lvl[:, n * span:] == level).any(1)).nonzero()[0].item()
            raise ValueError(f"plan row {rows}: level {level} must cover whole aligned spans of {span} tokens")


def build_working_context(plan: torch.Tensor, levels, block_size: int, sample_idx: torch.Tensor | None = None,
                          length: int | None = None, align: str = "right", check: bool = True,
                          dtype: torch.dtype | None = None) -> WorkingContext:
    """WorkingContext for each plan row: wc_layout (which entry sits in which slot) + gather_embeddings.

    levels: [lod0 [B, T, C], lod1 [B, n1, C], lod2 [B, n2, C], ...]; an entry may be None when the
      plan never uses that level (e.g. LOD0 dropped by cache_lod0=False: pass the token embeddings).
    sample_idx: long [R], the batch row of `levels` each plan row reads (default: row r reads r).
    length: pad to this many slots (default: the longest row); align: "right" (pad first) | "left".
      With length given and check=False nothing here waits on the device (no .item()/int() of a tensor).
    """
    shapes = [None if x is None else tuple(x.shape[:2]) for x in levels]
    wc, flat = wc_layout(plan, shapes, block_size, sample_idx, length, align, check)
    return gather_embeddings(wc, flat, levels, dtype)


def wc_layout(plan: torch.Tensor, level_shapes, block_size: int, sample_idx: torch.Tensor | None = None,
              length: int | None = None, align: str = "right", check: bool = True):
    """(WorkingContext without embeddings, flat long [R, L]): the slots of every plan's entries, from the levels'
    shapes alone (level_shapes: (B, n_l) per level, None for a level not given), so it can be built before the
    tree (training's --mc_async prepares it while the GPT runs the previous micro-batch). flat: each entry's row
    in the levels concatenated flat (entry (sample b, level l, unit j) reads row offset_l + b * n_l + j)."""
    if align not in ("right", "left"):
        raise ValueError(f"align must be 'right' or 'left', got {align!r}")
    R, T = plan.shape
    device = plan.device
    top = len(level_shapes) - 1
    if check:
        check_plan(plan, block_size, max_lod=top)
    if sample_idx is None:
        sample_idx = torch.arange(R, device=device)
    lvl = plan.long()
    starts = entry_starts(plan, block_size, max_level=top)
    counts = starts.sum(1)
    if length is None:
        L = int(counts.max()) if R else 0
    else:
        # with check=False the caller guarantees the fit, so no host sync on counts.max() (training path)
        if check and R and int(counts.max()) > length:
            raise ValueError(f"a plan produces {int(counts.max())} entries but length={length} slots were requested")
        L = length
    rank = starts.long().cumsum(1) - 1
    slot = rank + (L - counts)[:, None] if align == "right" else rank
    slot = torch.where(starts, slot, L)  # non-starts land in a spare column L, dropped below
    t = torch.arange(T, device=device).expand(R, T)
    span_start = torch.zeros(R, L + 1, dtype=torch.long, device=device).scatter_(1, slot, t)[:, :L]
    j = torch.arange(L, device=device)[None, :]
    valid = (j >= L - counts[:, None]) if align == "right" else (j < counts[:, None])
    lod = torch.where(valid, lvl.gather(1, span_start) if T else span_start, -1)
    spans = _spans(block_size, top, device)
    span_len = torch.where(valid, spans[lod.clamp(min=0)], 0)
    span_start = torch.where(valid, span_start, 0)
    positions = torch.where(valid, span_start + span_len - 1, 0).float()

    if all(shape is None for shape in level_shapes):
        raise ValueError("build_working_context needs at least one level tensor")
    offsets, off = [], 0
    for level, shape in enumerate(level_shapes):
        offsets.append(off)
        if shape is None:
            if (lod == level).any():
                what = "LOD0 (token embeddings; dropped by --mc_cache_lod0=0, pass them in)" if level == 0 else f"LOD{level}"
                raise ValueError(f"the plan uses {what} but levels[{level}] is None")
            continue
        if level == 0 and shape[1] < T:
            raise ValueError(f"levels[0] has {shape[1]} tokens but the plan covers T={T}")
        off += shape[0] * shape[1]
    # Each level's row offset in the table and entries per sample, picked per entry with Python scalars
    # (kernel arguments) instead of index tensors copied from the host, which block the step on CUDA.
    lod_c = lod.clamp(min=0)
    base, per_sample = torch.zeros_like(lod_c), torch.zeros_like(lod_c)
    for level, shape in enumerate(level_shapes):
        if shape is not None:
            here = lod_c == level
            base = torch.where(here, offsets[level], base)
            per_sample = torch.where(here, shape[1], per_sample)
    flat = base + sample_idx[:, None] * per_sample + span_start // spans[lod_c]
    flat = torch.where(valid, flat, 0)
    return WorkingContext(None, positions, lod, span_start, span_len, valid, sample_idx), flat


def gather_embeddings(wc: WorkingContext, flat: torch.Tensor, levels, dtype: torch.dtype | None = None) -> WorkingContext:
    """wc with its embeddings [R, L, C]: one gather from the levels concatenated flat (wc_layout's flat), so
    gradients reach every level."""
    present = [x for x in levels if x is not None]
    dtype = dtype or reduce(torch.promote_types, [x.dtype for x in present])
    C = present[0].size(-1)
    tables = [x.reshape(-1, C).to(dtype) for x in present]
    table = torch.cat(tables, 0) if len(tables) > 1 else tables[0]
    R, L = flat.shape
    emb = table[flat.reshape(-1)].view(R, L, C) * wc.valid[..., None].to(dtype)
    return dataclasses.replace(wc, embeddings=emb)


def targets_for(wc: WorkingContext, tokens: torch.Tensor) -> torch.Tensor:
    """long [R, L]: the token after each entry's span, tokens[sample, span_start + span_len]; -1 for padding
    and where that index is past the end of `tokens`. Pass the T+1 tokens of a training row (x with the
    last y appended) to give the newest entry a target too; with x alone it gets -1."""
    rows = tokens[wc.sample_idx]  # [R, T']
    Tp = rows.size(1)
    end = wc.span_start + wc.span_len
    ok = wc.valid & (end < Tp)
    return torch.where(ok, rows.gather(1, end.clamp(max=Tp - 1)), -1)


def check_invariants(wc: WorkingContext, history_len: int, block_size: int = 32, max_len: int | None = None,
                     max_lod: int | None = None, full_cover: bool = True):
    """Raise ValueError naming the first broken rule. Rules, per row: valid slots form one contiguous run;
    entries are ordered and tile [start, history_len) with no gap or overlap (start = 0 when full_cover);
    a LOD-l entry spans exactly bs**l tokens and starts at a multiple of it; 0 <= lod <= max_lod;
    at most max_len entries."""
    v, s, n, lod = wc.valid, wc.span_start, wc.span_len, wc.lod
    R, L = v.shape
    j = torch.arange(L, device=v.device)[None, :]
    counts = v.sum(1)
    first = torch.where(counts > 0, v.long().argmax(1), 0)
    run = (j >= first[:, None]) & (j < (first + counts)[:, None])

    def fail(mask, what):
        if mask.any():
            r, *rest = mask.nonzero()[0].tolist()
            where = f"row {r}" + (f", slot {rest[0]}" if rest else "")
            raise ValueError(f"working context invariant broken at {where}: {what}")

    fail(run != v, "valid entries are not one contiguous run")
    if max_len is not None:
        fail(counts > max_len, f"more than max_len={max_len} entries")
    top = max_lod if max_lod is not None else 12  # 32**12 still fits in int64
    fail(v & ((lod < 0) | (lod > top)), f"lod outside [0, {top}]")
    expected_len = block_size ** lod.clamp(0, top)
    fail(v & (n != expected_len), f"span_len is not block_size**lod (block_size={block_size})")
    fail(v & (s % n.clamp(min=1) != 0), "gist span is not aligned to its length")
    end = s + n
    pair = v[:, 1:] & v[:, :-1]
    fail(pair & (s[:, 1:] != end[:, :-1]), "entries out of order, overlapping, or with a gap")
    last = (first + counts - 1).clamp(min=0)
    has = counts > 0
    fail(has & (end.gather(1, last[:, None])[:, 0] != history_len), f"last entry does not end at {history_len}")
    if full_cover:
        fail(~has & (history_len > 0), "empty working context for a non-empty history")
        fail(has & (s.gather(1, first[:, None])[:, 0] != 0), "does not start at token 0 (full_cover)")


def plan_from_wc(wc: WorkingContext, history_len: int) -> torch.Tensor:
    """The inverse of build_working_context: int8 [R, history_len] plan (tokens not covered -> -1)."""
    v = wc.valid
    R = v.size(0)
    before = v.long().cumsum(1) == 0  # padding ahead of the first entry
    big = history_len + 1
    starts = torch.where(v, wc.span_start, torch.where(before, -1, big)).contiguous()
    t = torch.arange(history_len, device=v.device).expand(R, history_len).contiguous()
    idx = (torch.searchsorted(starts, t, right=True) - 1).clamp(min=0)
    covered = v.gather(1, idx) & (t >= starts.gather(1, idx)) & (t < (wc.span_start + wc.span_len).gather(1, idx))
    return torch.where(covered, wc.lod.gather(1, idx), -1).to(torch.int8)
