"""
Evaluation items for scripts/mc_eval.py: token sequences with the answers and facts located in tokens.

An EvalItem is ids[0..T] (ids[0] = BOS; history x = ids[:T], targets ids[1:]) plus
- answers: token spans whose tokens are scored for recall (NLL, and exact match), each with the end
  of its nearest source (where the value was last seen) and whether it is long-range (in the horizon,
  source entirely before the cut T - W; see mc/eval/conditions.py);
- needles: token spans ORACLE keeps raw (the facts the long-range answers need).

Four kinds:
- "doc"   a held-out synthetic document (nanochat/synthetic.py, split val) cut to exactly T + 1 tokens
          (generated long enough first; about 4-5 long-range recalls land in the last 512 tokens of a
          2048-token document). Recall char spans map to tokens through mc/eval/conditions.py's offset
          mapping; a recall's source is the nearest earlier copy of its value.
- "text"  a document from --data_dir (first T + 1 tokens); no annotations.
- "probe" a passkey or key-value needle in a haystack of exactly T + 1 tokens (T = m * W):
              [BOS] haystack ... needle ... haystack  query answer
          haystack = a synthetic val document (other facts in it are distractors; the needle's cue is
          chosen to appear nowhere in it), needle = " The passkey for the blue vault is 48213." or
          " The harbour ledger reads: amber=4821.", query = " What is the passkey for the blue vault? "
          or " What is amber's value? ", answer = the value and the closing "." (so "482137" fails).
          The needle goes after a sentence end of the haystack (a word boundary when no sentence end fits),
          entirely before the cut, at the boundary closest to a uniformly drawn position; `straddle` asks
          for a placement where the value's tokens cross a block boundary (a // bs != (a + n - 1) // bs,
          mc/eval/conditions.straddles) or, when False, lie in one block; probe_items asks for half of
          each. The haystack is ONE synthetic document grown to >= T tokens (long_document raises its
          target_chars; documents are never concatenated), so a 16 x W probe is one long story.
          Pieces are tokenized separately and concatenated; they meet at pre-token boundaries (a space
          before a word, "." after a value), where that equals tokenizing the whole text.
- "task"  a row {"context", "question", "answer"} of --tasks FILE.jsonl: context + "\\n\\n" + question,
          then " " + answer as the answer tokens; the last occurrence of the answer in the context is
          its source (and ORACLE's needle). Long rows are trimmed at the oldest end so that T - W is a
          multiple of the block size (the cut must be block-aligned).
"""

import hashlib
import json
import random
import re
from dataclasses import dataclass, field

import numpy as np

from mc.eval.conditions import (
    char_byte_offsets,
    char_span_to_tokens,
    is_long_range,
    nearest_source,
    straddles,
    token_byte_starts,
)
from nanochat.synthetic import LEDGER_KEYS, LEDGER_NAMES, VAULT_ADJS, VAULT_NOUNS, synthetic_document

PROBE_INDEX_OFFSET = 1_000_000  # haystack documents: val indices far from the NLL documents' 0, 1, 2, ...


@dataclass
class Answer:
    span: tuple            # ids span [u0, u1) of the answer tokens (each is the target of the token before it)
    source_end: int        # ids index just after the nearest source of the value (0 = no source in the history)
    kind: str              # "passkey" | "kv" | "attribute" | "task"
    long_range: bool = False


@dataclass
class EvalItem:
    ids: list
    kind: str              # "doc" | "text" | "probe" | "task"
    answers: list = field(default_factory=list)
    needles: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def T(self) -> int:
        return len(self.ids) - 1


def _spans(tokenizer_bytes, ids, text):
    """(char byte offsets, token byte starts) for text encoded as ids[1:] after a BOS (0 bytes)."""
    return char_byte_offsets(text), token_byte_starts(np.asarray(tokenizer_bytes)[np.asarray(ids)])


def _seed(*parts) -> int:
    """Stable 64-bit seed (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def long_document(tokenizer, index: int, split: str, seed: int, min_tokens: int, reserved_vaults=()):
    """(SyntheticDoc, its tokens) of at least min_tokens tokens: start at ~2 chars per token and regrow
    target_chars by the shortfall until the document is long enough (deterministic). reserved_vaults: vault
    names it must not use (nanochat.synthetic.synthetic_document)."""
    chars = int(min_tokens * 2.0) + 200
    for _ in range(30):
        doc = synthetic_document(index, split, seed, target_chars=chars, reserved_vaults=reserved_vaults)
        tokens = tokenizer.encode(doc.text)
        if len(tokens) >= min_tokens:
            return doc, tokens
        chars = int(chars * max(1.1, 1.05 * min_tokens / max(len(tokens), 1)))
    raise RuntimeError(f"could not grow synthetic document {index} to {min_tokens} tokens")


def doc_item(tokenizer, piece_bytes, index: int, T: int, W: int, H: int, split: str = "val", seed: int = 0) -> EvalItem:
    """Synthetic document `index` cut to exactly T + 1 ids, with its recalls as answers."""
    bos = tokenizer.get_bos_token_id()
    doc, tokens = long_document(tokenizer, index, split, seed, T)
    ids = [bos] + tokens[:T]
    char_bytes, tok_starts = _spans(piece_bytes, ids, doc.text)
    item = EvalItem(ids, "doc", info={"index": index})
    covered = tok_starts[-1] + piece_bytes[ids[-1]]  # bytes of text inside the T + 1 ids
    for k, r in enumerate(doc.recalls):
        if char_bytes[r.answer_end] > covered:
            continue
        span = char_span_to_tokens(r.answer_start, r.answer_end, char_bytes, tok_starts)
        src = nearest_source(doc.text, doc.recalls, k)
        src_span = char_span_to_tokens(src[0], src[1], char_bytes, tok_starts)
        ans = Answer(span, src_span[1], r.kind, is_long_range(span, src_span[1], T, W, H))
        item.answers.append(ans)
        if ans.long_range:  # ORACLE: the fact statement (cue + value) and the nearest copy, raw
            fact = char_span_to_tokens(r.fact_start, max(r.fact_start + 1, _value_end(doc.text, r)), char_bytes, tok_starts)
            item.needles += [fact, src_span]
    return item


def _value_end(text, r) -> int:
    value = text[r.answer_start: r.answer_end]
    at = text.find(value, r.fact_start)
    return at + len(value) if 0 <= at < r.answer_start else r.fact_start + 1


def text_item(tokenizer, text: str, T: int) -> EvalItem | None:
    """The first T + 1 ids of a document, or None when it is shorter."""
    tokens = tokenizer.encode(text)
    if len(tokens) < T:
        return None
    return EvalItem([tokenizer.get_bos_token_id()] + tokens[:T], "text")


# ------------------------------------------------------------------ needle-in-a-haystack probes
ALL_VAULTS = [f"{a} {n}" for a in VAULT_ADJS for n in VAULT_NOUNS]


def _needle(rng: random.Random, kind: str, haystack: str):
    """(needle text ending with the value's prefix, value, query) with a cue absent from the haystack."""
    if kind == "passkey":
        objs = [v for v in ALL_VAULTS if v not in haystack]
        if not objs:
            raise RuntimeError("every vault occurs in the haystack; probe_item regrows it without the cue")
        obj = rng.choice(objs)
        value = str(rng.randint(10_000, 999_999))
        return f" The passkey for the {obj} is ", value, f" What is the passkey for the {obj}? "
    keys = [k for k in LEDGER_KEYS if not re.search(rf"\b{k}\b", haystack)]
    if not keys:
        raise RuntimeError("every ledger key occurs in the haystack; use another haystack document")
    key, ledger = rng.choice(keys), rng.choice(LEDGER_NAMES)
    value = str(rng.randint(100, 9999))
    return f" The {ledger} ledger reads: {key}=", value, f" What is {key}'s value? "


def probe_item(tokenizer, index: int, T: int, W: int, block_size: int, kind: str, straddle: bool,
               seed: int = 0, at: float | None = None) -> EvalItem:
    """A needle-in-a-haystack item of exactly T + 1 ids (see the module docstring). at: where the needle
    goes, as a fraction of the room before the cut (None: uniformly drawn, as mc_eval's probes)."""
    if kind not in ("passkey", "kv"):
        raise ValueError(f"probe kind must be passkey or kv, got {kind!r}")
    rng = random.Random(_seed("mc-eval-probe", seed, index, T, kind, straddle))
    bos = tokenizer.get_bos_token_id()
    for attempt in range(8):
        hay_doc, hay = long_document(tokenizer, PROBE_INDEX_OFFSET + 97 * index + attempt, "val", seed, T)
        hay_text = hay_doc.text
        if kind == "passkey" and all(v in hay_text for v in ALL_VAULTS):
            # a haystack long enough (~250K tokens) names every vault: regrow it without one, the needle's cue,
            # so the question asks about a vault stated once in the whole history
            cue = ALL_VAULTS[rng.randrange(len(ALL_VAULTS))]
            hay_doc, hay = long_document(tokenizer, PROBE_INDEX_OFFSET + 97 * index + attempt, "val", seed, T,
                                         reserved_vaults=(cue,))
            hay_text = hay_doc.text
        pre_text, value, query_text = _needle(rng, kind, hay_text)
        pre, val, dot = tokenizer.encode(pre_text), tokenizer.encode(value), tokenizer.encode(".")
        needle, query, answer = pre + val + dot, tokenizer.encode(query_text), val + dot
        piece = {t: tokenizer.decode([t]) for t in set(hay)}
        ends = [j + 1 for j, t in enumerate(hay) if piece[t].endswith(".")]  # after a sentence's "."
        words = [j for j, t in enumerate(hay) if piece[t].startswith(" ")]  # before a word (fallback)
        if not ends:
            continue
        k = ends[-1]  # the haystack ends at its last sentence end; then the query
        fixed = len(needle) + len(query) + len(answer)
        target = rng.uniform(block_size, max(block_size, T - W - len(needle)))  # drawn always: same rng stream
        if at is not None:
            target = block_size + at * max(0, T - W - len(needle) - block_size)
        best = None
        for candidates in (ends, words):  # sentence boundaries first; word boundaries when none fits
            for j in candidates:
                start = 1 + T - fixed - (k - j)  # ids index of the needle's first token
                prefix = start - 1  # haystack tokens before the needle
                a = start + len(pre)
                if j > k or prefix < 0 or j - prefix < 0 or start + len(needle) > T - W:
                    continue
                if straddles(a, len(val), block_size) != straddle:
                    continue
                if best is None or abs(start - target) < abs(best[1] - target):
                    best = (j, start)
            if best is not None:
                break
        if best is None:
            continue
        j, start = best
        body = hay[j - (start - 1): j] + needle + hay[j:k] + query
        ids = [bos] + body + answer
        assert len(ids) == T + 1, (len(ids), T)
        a = start + len(pre)
        ans = Answer((T + 1 - len(answer), T + 1), a + len(val), kind,
                     long_range=a + len(val) <= T - W)
        return EvalItem(ids, "probe", [ans], [(start, start + len(needle))],
                        info={"fact": kind, "straddle": straddle, "value_token": a, "distance": T - a})
    raise RuntimeError(f"could not place a {'straddling ' if straddle else ''}{kind} needle in {T} tokens "
                       f"(W={W}); the history must be longer than the window by a few sentences")


def probe_items(tokenizer, n: int, T: int, W: int, block_size: int, seed: int = 0) -> list:
    """n probes: kinds alternate passkey / kv; in every run of 4, the last two needles' values straddle a
    block boundary (half of each kind: equal groups give the straddling vs inside comparison its
    tightest intervals)."""
    return [probe_item(tokenizer, i, T, W, block_size, "passkey" if i % 2 == 0 else "kv", straddle=(i % 4 >= 2),
                       seed=seed) for i in range(n)]


# ------------------------------------------------------------------ tasks file
def read_tasks(path: str) -> list:
    """Rows of a JSONL file, each {"context": str, "question": str, "answer": str} (clear error otherwise)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("context", "question", "answer")) \
                    or not row["answer"].strip():
                raise ValueError(f'{path}:{lineno}: each row needs string fields "context", "question" and a '
                                 f'non-empty "answer"')
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def task_item(tokenizer, piece_bytes, row: dict, W: int, H: int, block_size: int) -> EvalItem:
    """context + "\\n\\n" + question, answer " " + answer; trimmed at the oldest end so T - W is block-aligned."""
    bos = tokenizer.get_bos_token_id()
    context = row["context"]
    prompt = tokenizer.encode(context + "\n\n" + row["question"].strip())
    answer = tokenizer.encode(" " + row["answer"].strip())
    ids = [bos] + prompt + answer
    T = len(ids) - 1
    drop = (T - W) % block_size if T > W else 0
    ctx_ids = [bos] + tokenizer.encode(context)
    char_bytes, tok_starts = _spans(piece_bytes, ctx_ids, context)
    at = context.rfind(row["answer"].strip())
    ids = [bos] + ids[1 + drop:]
    T = len(ids) - 1
    span = (T + 1 - len(answer), T + 1)
    item = EvalItem(ids, "task", info={"trimmed": drop})
    source_end = 0
    if at >= 0:  # context tokens usually equal the prompt's first tokens (the context ends at a pre-token boundary)
        s0, s1 = char_span_to_tokens(at, at + len(row["answer"].strip()), char_bytes, tok_starts)
        if s0 - drop >= 1:
            source_end = s1 - drop
            item.needles.append((s0 - drop, s1 - drop))
    item.answers.append(Answer(span, source_end, "task", source_end > 0 and is_long_range(span, source_end, T, W, H)))
    return item
