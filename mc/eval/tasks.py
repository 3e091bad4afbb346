"""
Associative recall for scripts/mc_eval.py: K key-value pairs far behind the raw window, queries in it.

The format is the synthetic corpus's key-value ledger (nanochat/synthetic.py), so a model trained on
that corpus has seen it:
    fact   " The harbour ledger reads: amber=4821, cobalt=113, sable=77, oak=912."
    query  " What is cobalt's value? "            answer "113."    (the corpus recall
                                                                      "What is cobalt's value? 113.")
K pairs are split over ceil(K / 6) ledgers of 3-6 pairs (the corpus states 3-6 per ledger); keys are
distinct ledger keys that occur nowhere in the haystack (no distractor can answer a query), values
distinct integers in [100, 9999] (no value answers two queries).

One sequence, Q queries, Q items. Item k (k = 1..Q) is one history of exactly T + 1 tokens:
    [BOS] lead_k  PAIRS  middle  q_1 a_1 ... q_{k-1} a_{k-1}  q_k a_k
- PAIRS: the ledger statements; middle: haystack text (a synthetic val document) of D tokens from a
  sentence end to the haystack's last sentence end, D drawn uniformly so that the pairs lie at
  varying distances but always before the cut T - W of every item (D >= W);
- lead_k: the haystack tokens just before the pairs' sentence end, as many as make the item exactly
  T + 1 tokens (so every item of every sequence has the same T and the same block-aligned cut);
- the earlier queries with their answers stay in the raw window, like a conversation that asks one
  question after another; a_k (value + ".") is the scored answer: exact match = argmax equal to the
  answer at every answer position ("4821" then "." so "48213" fails).
"One query per refocus": each item is a separate history whose last tokens are q_k's question, so
the MC-LensNet condition refocuses once per query with that question in the raw window, and LensNet
can move detail to the pair being asked for. ORACLE's needle is the asked pair's "key=value" tokens.

Token spans: the statements are tokenized as one string; the char spans of each "key=value" and
value map to tokens through mc/eval/conditions.py's offset mapping (per-token byte lengths), so
the spans are right whatever the tokenizer merges. Pieces (haystack slices, statements, queries,
answers) meet at pre-token boundaries (a sentence's "." then a space-led word).
"""

import random
import re

import numpy as np

from mc.eval.conditions import char_byte_offsets, char_span_to_tokens, straddles, token_byte_starts
from mc.eval.data import Answer, EvalItem, _seed, long_document
from nanochat.synthetic import LEDGER_KEYS, LEDGER_NAMES

ASSOC_INDEX_OFFSET = 2_000_000  # haystack val documents: far from the NLL documents and the probes
ASSOC_QUERY = " What is {key}'s value? "
MAX_PER_LEDGER = 6


def ledger_groups(K: int) -> list:
    """Pairs per ledger: ceil(K / 6) ledgers, sizes as equal as possible (K = 8 -> [4, 4])."""
    if K < 1:
        raise ValueError(f"--assoc_pairs={K} must be >= 1")
    n = -(-K // MAX_PER_LEDGER)
    return [K // n + (1 if i < K % n else 0) for i in range(n)]


def ledger_text(ledgers: list, keys: list, values: list) -> tuple[str, list, list]:
    """(text, char spans of each "key=value", char spans of each value) for the statements."""
    parts, pair_spans, value_spans, pos, i = [], [], [], 0, 0
    for ledger, n in zip(ledgers, ledger_groups(len(keys))):
        head = f" The {ledger} ledger reads: "
        parts.append(head)
        pos += len(head)
        for j in range(n):
            pair = f"{keys[i]}={values[i]}"
            pair_spans.append((pos, pos + len(pair)))
            value_spans.append((pos + len(keys[i]) + 1, pos + len(pair)))
            sep = ", " if j < n - 1 else "."
            parts.append(pair + sep)
            pos += len(pair) + len(sep)
            i += 1
    return "".join(parts), pair_spans, value_spans


def assoc_sequence(tokenizer, piece_bytes, index: int, T: int, W: int, block_size: int, pairs: int = 8,
                   queries: int = 4, seed: int = 0) -> list:
    """The `queries` items of associative-recall sequence `index` (module docstring), each T + 1 ids."""
    if not 1 <= queries <= pairs:
        raise ValueError(f"--assoc_queries={queries} must be in [1, --assoc_pairs={pairs}]")
    if pairs > len(LEDGER_KEYS) // 2:
        raise ValueError(f"--assoc_pairs={pairs} is too many: the corpus has {len(LEDGER_KEYS)} ledger keys")
    rng = random.Random(_seed("mc-eval-assoc", seed, index, T, pairs, queries))
    bos = tokenizer.get_bos_token_id()
    piece_bytes = np.asarray(piece_bytes)
    for attempt in range(8):
        hay_doc, hay = long_document(tokenizer, ASSOC_INDEX_OFFSET + 97 * index + attempt, "val", seed, T + 64)
        free = [k for k in LEDGER_KEYS if not re.search(rf"\b{k}\b", hay_doc.text)]
        if len(free) < pairs:
            continue
        keys = rng.sample(free, pairs)
        values = [str(v) for v in rng.sample(range(100, 10_000), pairs)]
        ledgers = rng.sample(LEDGER_NAMES, len(ledger_groups(pairs)))
        text, pair_chars, value_chars = ledger_text(ledgers, keys, values)
        stmt = tokenizer.encode(text)
        cb, starts = char_byte_offsets(text), token_byte_starts(piece_bytes[np.asarray(stmt)])
        pair_tok = [char_span_to_tokens(a, b, cb, starts) for a, b in pair_chars]
        value_tok = [char_span_to_tokens(a, b, cb, starts) for a, b in value_chars]
        asked = rng.sample(range(pairs), queries)
        qa = [(tokenizer.encode(ASSOC_QUERY.format(key=keys[p])), tokenizer.encode(values[p]) + tokenizer.encode("."))
              for p in asked]
        qa_len = np.cumsum([len(q) + len(a) for q, a in qa]).tolist()  # tokens of q_1 a_1 ... q_k a_k
        if qa_len[-1] > W:  # every query of a sequence must sit in the raw window of its last item
            raise ValueError(f"{queries} queries need {qa_len[-1]} tokens, more than the raw window W={W}: "
                             f"lower --assoc_queries")
        piece = {t: tokenizer.decode([t]) for t in set(hay)}
        ends = [j + 1 for j, t in enumerate(hay) if piece[t].endswith(".")]
        if len(ends) < 2:
            continue
        e = ends[-1]
        P = len(stmt)
        # middle length D: the pairs end before the cut (D >= W) and every lead fits: lead_k >= 0 for the
        # last query, lead_1 <= j (enough haystack before the pairs' sentence end j = e - D)
        hi = T - P - qa_len[-1]
        if hi < W:
            raise ValueError(f"a history of T={T} tokens cannot hold {pairs} pairs ({P} tokens) at least W={W} "
                             f"tokens before {queries} queries; raise --assoc_multiplier or lower --assoc_pairs")
        target = rng.uniform(W, hi)
        cands = [j for j in ends if W <= e - j <= hi and T - P - (e - j) - qa_len[0] <= j]
        if not cands:
            continue
        j = min(cands, key=lambda j: abs(e - j - target))
        D = e - j
        items = []
        for k, p in enumerate(asked):
            lead = T - P - D - qa_len[k]
            body = hay[j - lead: j] + stmt + hay[j:e]
            for q, a in qa[:k]:
                body += q + a
            q, a = qa[k]
            ids = [bos] + body + q + a
            assert len(ids) == T + 1, (len(ids), T)
            off = 1 + lead  # ids index of the statements' first token
            v0, v1 = value_tok[p][0] + off, value_tok[p][1] + off
            ans = Answer((T + 1 - len(a), T + 1), v1, "assoc", long_range=v1 <= T - W)
            items.append(EvalItem(ids, "assoc", [ans], [(pair_tok[p][0] + off, pair_tok[p][1] + off)],
                                  info={"fact": "assoc", "sequence": index, "query": k, "pair": p,
                                        "value": values[p], "key": keys[p], "value_token": v0,
                                        "straddle": straddles(v0, v1 - v0, block_size), "distance": T - v0}))
        return items
    raise RuntimeError(f"could not build associative-recall sequence {index} with {pairs} pairs in {T} tokens "
                       f"(W={W}); the history must be longer than the window by a few sentences")


def assoc_items(tokenizer, piece_bytes, n: int, T: int, W: int, block_size: int, pairs: int = 8, queries: int = 4,
                seed: int = 0) -> list:
    """n sequences x `queries` items (assoc_sequence), in sequence order."""
    return [it for i in range(n) for it in assoc_sequence(tokenizer, piece_bytes, i, T, W, block_size, pairs,
                                                          queries, seed)]
