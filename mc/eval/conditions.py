"""
The evaluation conditions of scripts/mc_eval.py as plans, the token sets they are scored on, and the
char -> token offset mapping that places answers and facts. Pure functions, no model.

Indexing. An evaluated sequence is ids[0..T] (T + 1 tokens, ids[0] = BOS). The history (inputs) is
x = ids[0..T), targets y[t] = ids[t + 1]: the raw entry of token t predicts ids[t + 1], a gist of
[s, s + n) predicts ids[s + n] (mc/working_context.py). Plans are int8 [T] over the history
(0 raw, l >= 1 inside a LOD-l gist, -1 not in the working context).

The shared raw window. Every condition keeps at least the same last W tokens raw: [T - W, T),
cut = T - W, a multiple of block_size (the caller trims the oldest tokens to make it so), and every
condition is scored on those W targets. They differ only in what stands for the history before the
cut (FULL and the RECENCY-EQ pair: more raw tokens), so any NLL difference on the window's tokens is
caused by that representation:
    FULL      everything raw (only run when T fits the model's sequence_len)
    RECENCY   nothing: the window alone (the baseline a plain W-token model has)
    RECENCY-EQ  RECENCY at equal entries: the last n raw tokens, n = the entries MC reads (the
              covering's gists + W). Not the shared window: n >= W tokens raw, so it is the one
              comparison that answers "are gists worth more than the same number of raw tokens?"
              It is scored on the same window targets (the last W). Its cut T - n is NOT rounded to
              a block: it has no gists, so nothing needs the alignment, and rounding would break
              the exact entry match.
    RECENCY-EQ-FOCUS  the same at the focus budget: n = the entries MC-fixed reads (covering + E)
    MEANPOOL  the coarsest gist covering of [0, cut), gists = mean of the block's embeddings
    MC        the same covering, gists from the checkpoint's GistNet
    MC-fixed  the covering plus E extra entries of detail spent by a fixed, non-learned policy:
              expand the most recent gist before the cut, one level at a time (recency-biased
              detail: the LOD1 block just before the cut becomes raw first, then the one before it;
              a LOD2 unit opens into LOD1 gists when it is the latest gist left)
    MC-LensNet the covering refocused once by the checkpoint's LensNet + allocator (mc/focus.py)
              under the budget covering + E, the raw window protected (run by the script)
    SHUFFLED  the same covering, gists taken from ANOTHER document (if the model uses the gists'
              content, this must be worse than MC, and no better than RECENCY)
    MC-KEYMATCH the covering plus E entries spent by a parameter-free scorer (MoBA-style): blocks
              whose mean-pooled layer-0 keys best match the question's queries become raw
              (mc/eval/keymatch_condition.py)
    ORACLE    the covering with the blocks holding the needed facts expanded to raw tokens first;
              what is left of E is then spent like MC-fixed, so ORACLE, MC-fixed, MC-KEYMATCH and
              MC-LensNet read the same number of entries whenever the needles cost <= E (else ORACLE
              uses more; MC-KEYMATCH and MC-LensNet may use less when no further expansion fits)
The coarsest covering ("the most recent tokens raw, then LOD1 gists, LOD2 for far history when long
enough") is the covering the allocator starts from: token t < cut sits in the coarsest aligned unit
[j bs^l, (j+1) bs^l) that lies entirely inside [0, cut), l <= max_lod. With cut = 2976, bs = 32:
[0, 2048) as two LOD2 gists, [2048, 2976) as 29 LOD1 gists, then the raw window. The cut must be
block-aligned so that gists cover [0, cut) exactly and the raw window is the same as RECENCY's.
Entries: n_2 + (n_1 - bs n_2) + W with n_l = cut // bs^l (max_lod = 2).

The focus budget E (entries beyond the covering). Expanding a gist one level replaces 1 entry by bs:
+ (bs - 1) entries. A block inside a LOD2 unit becomes raw for 2 (bs - 1) (open the unit, then the
block), each further block of the same unit for bs - 1 more. The script's default
E = 4 (bs - 1) = 124 therefore lets ORACLE make any needle of up to 3 blocks inside one LOD2 unit raw
(a passkey statement is ~15 tokens: 1-2 blocks) at exactly the budget MC-fixed and MC-LensNet get.

Token sets, over the window's targets (index i = t - cut, t in [cut, T), target ids[t + 1]):
    horizon      the last H targets (i >= W - H): "the evaluated tail"
    boundary     the first `boundary` targets after the cut (i < 64 by default): local continuity,
                 where RECENCY has almost no context and any representation of the past helps
    long_range   answer tokens of recalls inside the horizon whose nearest source (the fact, or an
                 earlier repetition of its value) ends before the cut: no condition but FULL and
                 ORACLE sees it raw, so only memory of the far past can predict them
Gap recovery R on a set = (NLL_RECENCY - NLL_cond) / (NLL_RECENCY - NLL_FULL), and R_eq the same with
RECENCY-EQ (or RECENCY-EQ-FOCUS) in place of RECENCY (REFERENCES; see mc/eval/stats.py).

Offset mapping. Recall annotations are char offsets into the text; the model sees tokens. Decoding
each token on its own gives its byte length; cumulative sums give every token's byte start, and
UTF-8 lengths of the chars give every char's byte offset. A char span [a, b) then maps to the tokens
overlapping its bytes: first = the last token starting at or before byte(a), end = the first token
starting at or after byte(b). A token that holds both the answer and a neighbouring char (" Oslo"
with its space) counts as an answer token.
"""

import numpy as np
import torch

from mc.working_context import entry_counts

CONDITIONS = ("FULL", "RECENCY", "RECENCY-EQ", "RECENCY-EQ-FOCUS", "MEANPOOL", "MC", "MC-fixed", "MC-KEYMATCH",
              "MC-LensNet", "SHUFFLED", "ORACLE")
FOCUSED = ("MC-fixed", "MC-KEYMATCH", "MC-LensNet", "ORACLE")  # conditions that get the focus budget E
# the gap recoveries reported (JSON key: reference condition): R vs the W-token window, R_eq vs the raw
# window at MC's entries, and vs the raw window at the focus conditions' entries
REFERENCES = {"gap_recovery": "RECENCY", "gap_recovery_eq": "RECENCY-EQ", "gap_recovery_eq_focus": "RECENCY-EQ-FOCUS"}
BOUNDARY_TOKENS = 64


# ------------------------------------------------------------------ plans
def full_plan(T: int) -> torch.Tensor:
    """int8 [T]: every token raw."""
    return torch.zeros(T, dtype=torch.int8)


def recency_plan(T: int, W: int) -> torch.Tensor:
    """int8 [T]: the last min(W, T) tokens raw, the rest outside the working context (-1)."""
    plan = torch.zeros(T, dtype=torch.int8)
    plan[: max(T - W, 0)] = -1
    return plan


def equal_entries_plan(reference: torch.Tensor, block_size: int = 32) -> torch.Tensor:
    """RECENCY-EQ(-FOCUS): int8 [T], the last n tokens raw, n = the entries the reference plan [T] reads.
    The cut T - n need not be block-aligned (no gists), so the entry count matches exactly."""
    return recency_plan(reference.numel(), plan_entries(reference, block_size))


def check_cut(T: int, W: int, block_size: int) -> int:
    """The cut T - W (0 when the whole history fits in W); it must be block-aligned."""
    cut = max(T - W, 0)
    if cut % block_size:
        raise ValueError(f"history of {T} tokens with a raw window of {W}: the cut {cut} is not a multiple of "
                         f"block_size={block_size}; trim the oldest {cut % block_size} tokens (or choose T, W as "
                         f"multiples of {block_size})")
    return cut


def covering_plan(T: int, W: int, block_size: int = 32, max_lod: int = 2) -> torch.Tensor:
    """int8 [T]: [T - W, T) raw, [0, T - W) in the coarsest aligned gists (the MC fixed schedule)."""
    cut = check_cut(T, W, block_size)
    plan = torch.zeros(T, dtype=torch.int8)
    for level in range(1, max_lod + 1):  # finer first, so coarser units overwrite the tokens they cover
        span = block_size ** level
        plan[: (cut // span) * span] = level
    return plan


def expand_to_raw(plan: torch.Tensor, token_spans, block_size: int = 32) -> torch.Tensor:
    """Copy of `plan` with every block touching one of the token spans [a, b) expanded down to raw tokens.

    Expanding a LOD-l gist replaces it by its bs children of level l - 1 (the same tokens, one level
    finer), so the plan stays legal; repeat until the block is raw. Tokens already raw or outside the
    working context (-1) are left alone."""
    plan = plan.clone()
    T = plan.numel()
    for a, b in token_spans:
        a, b = max(int(a), 0), min(int(b), T)
        for block in range(a // block_size, (b - 1) // block_size + 1 if b > a else a // block_size):
            t = block * block_size
            while int(plan[t]) > 0:
                span = block_size ** int(plan[t])
                s = (t // span) * span
                plan[s: s + span] = int(plan[t]) - 1
    return plan


def plan_entries(plan: torch.Tensor, block_size: int = 32) -> int:
    """Working-context entries of one plan int8 [T]."""
    return int(entry_counts(plan[None], block_size)[0])


def recency_focus(plan: torch.Tensor, budget: int, limit: int, block_size: int = 32) -> torch.Tensor:
    """MC-fixed's policy: copy of `plan` with the most recent gist ending at or before token `limit`
    expanded one level, again and again, while the entries stay <= budget.

    Why this order: the latest gist is the one whose tokens lie closest to the raw window, so this is
    "a longer raw window, then finer gists behind it" - the natural non-learned way to spend detail.
    Each expansion costs bs - 1 entries; it stops when the next one would pass the budget or no gist
    is left (then the whole history before `limit` is raw)."""
    plan = plan.clone()
    c = block_size - 1
    n = plan_entries(plan, block_size)
    while n + c <= budget:
        gists = torch.nonzero(plan[:limit] > 0)
        if gists.numel() == 0:
            break
        t = int(gists[-1])
        level = int(plan[t])
        span = block_size ** level
        s = (t // span) * span
        plan[s: s + span] = level - 1
        n += c
    return plan


def fixed_focus_plan(T: int, W: int, budget_extra: int, block_size: int = 32, max_lod: int = 2) -> torch.Tensor:
    """MC-fixed: the covering plus `budget_extra` entries of recency-biased detail (recency_focus)."""
    base = covering_plan(T, W, block_size, max_lod)
    return recency_focus(base, plan_entries(base, block_size) + budget_extra, check_cut(T, W, block_size), block_size)


def oracle_plan(T: int, W: int, needle_spans, block_size: int = 32, max_lod: int = 2,
                budget_extra: int | None = None) -> torch.Tensor:
    """The MC covering with the blocks that hold the needed facts (token spans [a, b)) kept raw; with
    budget_extra, the rest of that budget (if the needles left any) is spent like MC-fixed."""
    base = covering_plan(T, W, block_size, max_lod)
    plan = expand_to_raw(base, needle_spans, block_size)
    if budget_extra is None:
        return plan
    return recency_focus(plan, plan_entries(base, block_size) + budget_extra, check_cut(T, W, block_size), block_size)


def straddles(first_token: int, n_tokens: int, block_size: int = 32) -> bool:
    """Whether tokens [first, first + n) cross a block boundary (their first and last block differ):
    a gist boundary through a value is the hard case for a gist-based memory."""
    return n_tokens > 0 and first_token // block_size != (first_token + n_tokens - 1) // block_size


def diagnostic_plans(block_start: int, context: int, following: int, block_size: int = 32) -> dict:
    """GistNet diagnostic plans over a history of T' = block_start + bs + following tokens, the last
    context + bs + following of them in the working context: {"raw": all raw, "gist": the block
    [block_start, block_start + bs) as one LOD1 gist}. The mean-pool variant reuses "gist" with mean
    gists; "dropped" reuses "raw" with the block's keys masked out (key_padding_mask)."""
    if block_start % block_size:
        raise ValueError(f"diagnostic block start {block_start} must be a multiple of block_size={block_size}")
    T = block_start + block_size + following
    raw = torch.zeros(T, dtype=torch.int8)
    raw[: max(0, block_start - context)] = -1
    gist = raw.clone()
    gist[block_start: block_start + block_size] = 1
    return {"raw": raw, "gist": gist}


# ------------------------------------------------------------------ token sets
def window_masks(T: int, W: int, H: int, boundary: int = BOUNDARY_TOKENS) -> dict:
    """bool [Wr] masks over the window's targets (Wr = min(W, T)): "horizon" and "boundary"."""
    Wr = min(W, T)
    if not 1 <= H <= W:
        raise ValueError(f"--horizon={H} must be in [1, W={W}]: the scored tokens must be raw in every condition")
    i = np.arange(Wr)
    return {"horizon": i >= Wr - min(H, Wr), "boundary": i < boundary}


def answer_mask(T: int, W: int, answer_spans) -> np.ndarray:
    """bool [Wr]: window targets that are answer tokens. answer_spans: token spans [u0, u1) in ids
    indexing (ids[u] is the target of window index u - 1 - (T - Wr)); parts outside the window are dropped."""
    Wr = min(W, T)
    cut = T - Wr
    mask = np.zeros(Wr, dtype=bool)
    for u0, u1 in answer_spans:
        lo, hi = max(u0 - 1 - cut, 0), min(u1 - 1 - cut, Wr)
        if hi > lo:
            mask[lo:hi] = True
    return mask


def is_long_range(answer_span, source_end: int, T: int, W: int, H: int) -> bool:
    """An answer (ids span [u0, u1)) is long-range when all its targets lie in the horizon and its
    nearest source (ids span ending at source_end, exclusive) lies entirely before the cut T - W."""
    u0, u1 = answer_span
    return T > W and source_end <= T - W and u0 - 1 >= T - min(H, W) and u1 - 1 <= T


# ------------------------------------------------------------------ offset mapping
def token_byte_starts(piece_lengths) -> np.ndarray:
    """int [n]: byte offset where each token starts, from each token's decoded byte length."""
    lengths = np.asarray(piece_lengths, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]) if lengths.size else lengths


def char_byte_offsets(text: str) -> np.ndarray:
    """int [len(text) + 1]: UTF-8 byte offset of every char boundary."""
    per_char = np.fromiter((len(ch.encode("utf-8")) for ch in text), dtype=np.int64, count=len(text))
    return np.concatenate([[0], np.cumsum(per_char)])


def char_span_to_tokens(char_start: int, char_end: int, char_bytes: np.ndarray, tok_starts: np.ndarray,
                        byte_offset: int = 0) -> tuple[int, int]:
    """Token span [first, end) of the tokens overlapping chars [char_start, char_end).

    byte_offset: bytes that precede the text in the token stream (0: a BOS decodes to no bytes).
    Zero-length tokens (BOS) never start an answer: first is the LAST token starting at or before the
    span's first byte."""
    if not 0 <= char_start < char_end <= len(char_bytes) - 1:
        raise ValueError(f"char span [{char_start}, {char_end}) is empty or outside the text ({len(char_bytes) - 1} chars)")
    b0, b1 = char_bytes[char_start] + byte_offset, char_bytes[char_end] + byte_offset
    first = int(np.searchsorted(tok_starts, b0, side="right")) - 1
    end = int(np.searchsorted(tok_starts, b1, side="left"))
    return max(first, 0), end


def nearest_source(text: str, recalls, k: int) -> tuple[int, int]:
    """Char span of the nearest earlier copy of recall k's value: the fact's own statement of the value
    (searched from fact_start) or the answer of an earlier recall of the same fact, whichever is later."""
    r = recalls[k]
    value = text[r.answer_start: r.answer_end]
    start = text.find(value, r.fact_start)
    best = (start, start + len(value)) if 0 <= start < r.answer_start else (r.fact_start, r.fact_start + 1)
    for q in recalls:
        if q.fact_start == r.fact_start and best[0] < q.answer_start < r.answer_start:
            best = (q.answer_start, q.answer_end)
    return best


# ------------------------------------------------------------------ batching working contexts
def pad_left(t: torch.Tensor, L: int, value) -> torch.Tensor:
    """[R, l, ...] -> [R, L, ...]: right-aligned, `value` in the new leading slots."""
    extra = L - t.size(1)
    if extra <= 0:
        return t
    pad = torch.full((t.size(0), extra, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], 1)
