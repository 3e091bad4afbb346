"""
Tests for nanochat/synthetic.py: determinism (also across processes), disjoint splits, exact recall
annotations, recall distances from tens to thousands of chars, and retrieval density.
"""

import collections
import hashlib
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.synthetic import Recall, SyntheticDoc, synthetic_document, synthetic_texts

REPO_ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 60  # documents checked in detail (each ~12k chars)


@pytest.fixture(scope="module")
def docs() -> list[SyntheticDoc]:
    return [synthetic_document(i) for i in range(N_DOCS)]


def test_deterministic_and_seedable():
    a = synthetic_document(7, "train", seed=3)
    b = synthetic_document(7, "train", seed=3)
    assert a == b
    assert synthetic_document(7, "train", seed=4).text != a.text
    assert synthetic_document(8, "train", seed=3).text != a.text


def test_stable_across_processes():
    """The seed comes from a stable hash, not Python's per-process salted hash()."""
    code = "import hashlib; from nanochat.synthetic import synthetic_document as s; " \
           "print(hashlib.sha256(s(11).text.encode()).hexdigest())"
    expected = hashlib.sha256(synthetic_document(11).text.encode()).hexdigest()
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             check=True, cwd=REPO_ROOT).stdout.strip()
        assert out == expected


def test_synthetic_texts_stream():
    it = synthetic_texts("val", seed=1, start=5)
    assert [next(it) for _ in range(3)] == [synthetic_document(i, "val", 1).text for i in (5, 6, 7)]


def test_splits_never_overlap():
    n = 300
    texts = {split: {synthetic_document(i, split, target_chars=600).text for i in range(n)}
             for split in ("train", "val", "test")}
    for split in texts:
        assert len(texts[split]) == n  # also no duplicates within a split
    for a, b in itertools.combinations(texts, 2):
        assert not texts[a] & texts[b], f"{a} and {b} share documents"


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        synthetic_document(0, "dev")
    with pytest.raises(ValueError, match="index"):
        synthetic_document(-1)


def test_length_close_to_target(docs):
    for doc in docs:
        assert 11_500 <= len(doc.text) <= 13_000
    short = synthetic_document(0, target_chars=3000)
    assert 2_800 <= len(short.text) <= 3_600 and short.recalls


def _statement(text: str, fact_start: int) -> str:
    """The fact statement: from fact_start to the end of its sentence."""
    return text[fact_start:text.index(".", fact_start) + 1]


def test_recall_spans_are_exact(docs):
    """Each answer span is exactly the value: non-empty, not padded, stated in the fact sentence that
    precedes it, and bounded by non-alphanumerics (so the span is a whole word/number)."""
    for doc in docs:
        text = doc.text
        for r in doc.recalls:
            assert isinstance(r, Recall) and r.kind in ("passkey", "kv", "attribute")
            answer = text[r.answer_start:r.answer_end]
            assert answer and answer == answer.strip() and answer.isalnum()
            assert r.fact_start < r.answer_start
            statement = _statement(text, r.fact_start)
            assert re.search(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", statement), (statement, answer)
            assert not text[r.answer_end].isalnum() and not text[r.answer_start - 1].isalnum()
            if r.kind in ("passkey", "kv"):
                assert answer.isdigit()


def test_passkey_and_ledger_recall_cue_names_the_fact(docs):
    """The text just before a passkey/kv answer names the same vault/key as the statement."""
    for doc in docs[:20]:
        for r in doc.recalls:
            statement = _statement(doc.text, r.fact_start)
            window = doc.text[max(0, r.answer_start - 80):r.answer_start]
            if r.kind == "kv":
                key = statement.split("=", 1)[0]
                assert key in window
            elif r.kind == "passkey":
                obj = re.search(r"the (\w+ \w+) (?:is|opens)", statement).group(1)
                assert obj in window


def test_every_fact_is_recalled(docs):
    """Every passkey statement and every ledger pair has at least one recall pointing at it."""
    for doc in docs:
        recalled = collections.Counter(r.fact_start for r in doc.recalls)
        stated = [m.start() for m in re.finditer(r"(The passkey for the|Remember this: the|Write it down, the code for the) "
                                                 r"\w+ \w+ (is|opens with passkey) \d+\.",
                                                 doc.text)]
        for ledger in re.finditer(r"ledger reads: ([^.]*)\.", doc.text):
            stated += [ledger.start(1) + m.start() for m in re.finditer(r"\w+=\d+", ledger.group(1))]
        assert stated
        assert all(recalled[s] >= 1 for s in stated)


def test_recall_distances_span_tens_to_thousands(docs):
    """Distances (answer_start - fact_start) are log-uniform-ish: tens, hundreds and thousands of chars."""
    dists = [r.answer_start - r.fact_start for d in docs for r in d.recalls]
    frac = lambda lo, hi: sum(lo <= d < hi for d in dists) / len(dists)
    assert min(dists) < 100          # tens of chars: recalled right after the statement
    assert max(dists) > 8_000        # across most of the document
    assert frac(0, 200) > 0.05
    assert frac(200, 1000) > 0.25
    assert frac(1000, 3000) > 0.1
    assert frac(3000, 10**6) > 0.05


def test_density(docs):
    """Dense in retrieval events. The measured failure (DESIGN.md) had one passkey per document; this
    corpus averages ~60 recalls per 12k chars (one per ~200 chars, i.e. one per ~50 tokens), about
    the density of the 12-20 facts per 1024 tokens of the second experiment. The per-document floor
    of 20 (one per ~600 chars) keeps even the sparsest document retrieval-heavy."""
    counts = [len(d.recalls) for d in docs]
    assert min(counts) >= 20
    assert sum(counts) / len(counts) >= 40
    kinds = collections.Counter(r.kind for d in docs for r in d.recalls)
    assert all(kinds[k] > 0.1 * sum(kinds.values()) for k in ("passkey", "kv", "attribute"))


def test_prose_is_varied(docs):
    """Filler is built from templates and word lists: no sentence dominates a document."""
    for doc in docs[:10]:
        sentences = [s.strip() for s in re.split(r"(?<=[.?])\s+", doc.text) if s.strip()]
        most = collections.Counter(sentences).most_common(1)[0][1]
        assert most <= max(3, 0.03 * len(sentences))
        assert len(set(sentences)) > 0.8 * len(sentences)


# ------------------------------------------------------------------ density "dense" (--source recall)
def test_story_density_is_unchanged_by_the_dense_option():
    """The default corpus is byte-for-byte what it was before "dense" existed (pinned hashes)."""
    pinned = ["4029bb75f019a1b4", "12f0254b5d6db0e1", "2f0ae5581a3b72e1"]
    got = [hashlib.sha256(synthetic_document(i, "val").text.encode()).hexdigest()[:16] for i in range(3)]
    assert got == pinned


def test_dense_documents_are_a_recall_drill():
    from nanochat.synthetic import MIN_DENSE_DISTANCE
    dense = [synthetic_document(i, density="dense") for i in range(20)]
    story = [synthetic_document(i) for i in range(20)]
    assert dense[0].text != story[0].text and synthetic_document(0, density="dense").text == dense[0].text
    per_char = lambda ds: sum(len(d.recalls) for d in ds) / sum(len(d.text) for d in ds)
    assert per_char(dense) > 2.5 * per_char(story)
    for d in dense:
        assert {r.kind for r in d.recalls} <= {"passkey", "kv"}
        for r in d.recalls:
            assert r.answer_start - r.fact_start >= MIN_DENSE_DISTANCE
            assert d.text[r.answer_start:r.answer_end].isdigit()
    with pytest.raises(ValueError, match="unknown density"):
        synthetic_document(0, density="sparse")
