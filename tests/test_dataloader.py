"""
Tests for nanochat/dataloader.py against a reference built by hand: the global stream
S = [BOS] doc0 [BOS] doc1 ..., global row g = S[g*T : g*T+T+1]. Checks the x/y shift, BOS at every
document start, the alignment contract (optimizer step n sees rows [n*R, (n+1)*R) for every
B/world/grad_accum split), and exact resumption from state_dict().
"""

import itertools
import json
import random

import pytest
import torch

from nanochat.dataloader import DOCS_PER_ENCODE, DistributedTokenLoader
from nanochat.dataset import TextSource, iter_documents, resolve_source

BOS = 1000


class FakeTokenizer:
    """Character-level stand-in for the real tokenizer: id = ord(c) % 997 + 1, BOS = 1000."""

    def __init__(self):
        self.docs_encoded = 0

    def get_bos_token_id(self):
        return BOS

    def _one(self, text, prepend):
        ids = [ord(c) % 997 + 1 for c in text]
        return ([prepend] if prepend is not None else []) + ids

    def encode(self, text, prepend=None, append=None, num_threads=8):
        if isinstance(text, str):
            return self._one(text, prepend)
        self.docs_encoded += len(text)
        return [self._one(t, prepend) for t in text]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> TextSource:
    """500 documents of 1..400 chars: many shorter than a row, many spanning several rows."""
    d = tmp_path_factory.mktemp("loader_data")
    rng = random.Random(0)
    words = "alpha beta gamma delta river stone lamp 4821 cobalt".split()
    with open(d / "docs.jsonl", "w") as f:
        for i in range(500):
            text = " ".join(rng.choice(words) for _ in range(rng.choice((1, 3, 10, 30, 70))))
            f.write(json.dumps({"text": f"doc{i}: {text}"}) + "\n")
    return resolve_source("dir", str(d))


def reference_rows(source, T, n_rows, split="train"):
    """Rows 0..n_rows-1 built directly from the packing rule, plus the document start positions."""
    tok = FakeTokenizer()
    stream, starts = [], []
    for text in iter_documents(source, split):
        starts.append(len(stream))
        stream += tok.encode(text, prepend=BOS)
        if len(stream) >= n_rows * T + 1:
            break
    return torch.tensor([stream[g * T:g * T + T + 1] for g in range(n_rows)]), starts, stream


def test_rows_shift_and_bos(source):
    B, T = 3, 32
    loader = DistributedTokenLoader(FakeTokenizer(), B, T, "train", source)
    rows, starts, stream = reference_rows(source, T, 10 * B)
    for c in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        assert torch.equal(x, rows[c * B:(c + 1) * B, :-1])
        assert torch.equal(y, rows[c * B:(c + 1) * B, 1:])
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        assert torch.equal(x[1:, 0], y[:-1, -1])  # consecutive rows continue the stream
    # every document starts with BOS, and BOS appears nowhere else
    bos_at = {i for i, t in enumerate(stream) if t == BOS}
    assert bos_at == set(starts)
    # a document longer than a row continues into the next row
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    assert max(lengths) > 3 * T


def test_first_tokens_decode_to_first_document(source):
    x, _ = DistributedTokenLoader(FakeTokenizer(), 1, 16, "train", source).next_batch()
    first = next(iter_documents(source, "train"))
    assert x[0, 0].item() == BOS
    assert x[0, 1:].tolist() == FakeTokenizer().encode(first[:15])


CONFIGS = [(4, 1, 2), (2, 1, 4), (2, 2, 2), (1, 2, 4), (8, 1, 1), (1, 4, 2), (2, 4, 1)]  # (B, world, accum)


def run_steps(source, T, B, world, accum, steps, states=None):
    """Simulate `steps` optimizer steps; returns the rows each step consumed, ordered by (k, rank)."""
    loaders = [DistributedTokenLoader(FakeTokenizer(), B, T, "train", source, rank=r, world_size=world,
                                      state=None if states is None else states[r]) for r in range(world)]
    per_step = []
    for _ in range(steps):
        rows = []
        for _k in range(accum):
            for r in range(world):
                x, y = loaders[r].next_batch()
                rows.append(torch.cat([x, y[:, -1:]], dim=1))  # rebuild the T+1-token rows
        per_step.append(torch.cat(rows))
    return per_step, loaders


def test_alignment_contract_same_rows_per_step(source):
    """R = B*world*accum = 8 rows per step: step n consumes global rows [8n, 8n+8) in every split,
    and micro-batch k of rank r holds rows n*R + (k*world + r)*B ... + B."""
    T, R, steps = 24, 8, 6
    rows, _, _ = reference_rows(source, T, R * steps)
    results = {}
    for B, world, accum in CONFIGS:
        assert B * world * accum == R
        per_step, _ = run_steps(source, T, B, world, accum, steps)
        for n, got in enumerate(per_step):
            assert torch.equal(got, rows[n * R:(n + 1) * R]), (B, world, accum, n)
        results[(B, world, accum)] = per_step
    baseline = results[CONFIGS[0]]
    for cfg, per_step in results.items():
        assert all(torch.equal(a, b) for a, b in zip(per_step, baseline)), cfg


def test_rank_chunks_interleave(source):
    """Rank r's chunk c is global rows [c*world*B + r*B, c*world*B + (r+1)*B)."""
    B, T, world = 2, 16, 3
    rows, _, _ = reference_rows(source, T, 5 * world * B)
    for r in range(world):
        loader = DistributedTokenLoader(FakeTokenizer(), B, T, "train", source, rank=r, world_size=world)
        for c in range(5):
            x, _ = loader.next_batch()
            first = c * world * B + r * B
            assert torch.equal(x, rows[first:first + B, :-1])


@pytest.mark.parametrize("B,world", [(3, 1), (2, 2), (1, 3)])
def test_resume_matches_uninterrupted(source, B, world):
    T, before, after = 40, 7, 9
    full, _ = run_steps(source, T, B, world, 1, before + after)
    _, loaders = run_steps(source, T, B, world, 1, before)
    states = [json.loads(json.dumps(ld.state_dict())) for ld in loaders]  # must survive JSON
    resumed, _ = run_steps(source, T, B, world, 1, after, states=states)
    for a, b in zip(resumed, full[before:]):
        assert torch.equal(a, b)


def test_resume_does_not_retokenize_from_start(source):
    T = 64
    loader = DistributedTokenLoader(FakeTokenizer(), 4, T, "train", source)
    for _ in range(60):
        loader.next_batch()
    state = loader.state_dict()
    assert state["doc_index"] > DOCS_PER_ENCODE  # far into the stream
    tok = FakeTokenizer()
    resumed = DistributedTokenLoader(tok, 4, T, "train", source, state=state)
    x, _ = resumed.next_batch()
    assert torch.equal(x, loader.next_batch()[0])
    assert tok.docs_encoded <= 2 * DOCS_PER_ENCODE  # only from the saved document on


def test_resume_with_a_different_split_of_the_batch(source):
    """A state from (B=2, world=2) resumes (B=4, world=1) at the same global row: 4 chunks of 4 rows."""
    T = 24
    _, loaders = run_steps(source, T, 2, 2, 2, 3)  # 3 steps of 8 rows = 24 rows done
    rows, _, _ = reference_rows(source, T, 40)
    loader = DistributedTokenLoader(FakeTokenizer(), 4, T, "train", source, state=loaders[1].state_dict())
    x, _ = loader.next_batch()
    assert torch.equal(x, rows[24:28, :-1])
    with pytest.raises(ValueError, match="multiple of world_size"):
        DistributedTokenLoader(FakeTokenizer(), 5, T, "train", source, state=loaders[0].state_dict())


def test_bad_state_and_arguments(source):
    loader = DistributedTokenLoader(FakeTokenizer(), 2, 16, "train", source)
    loader.next_batch()
    state = loader.state_dict()
    with pytest.raises(ValueError, match="max_seq_len"):
        DistributedTokenLoader(FakeTokenizer(), 2, 32, "train", source, state=state)
    with pytest.raises(ValueError, match="--source"):
        DistributedTokenLoader(FakeTokenizer(), 2, 16, "train", resolve_source("synthetic"), state=state)
    with pytest.raises(ValueError, match="malformed"):
        DistributedTokenLoader(FakeTokenizer(), 2, 16, "train", source, state={"version": 1})
    with pytest.raises(ValueError, match="rank"):
        DistributedTokenLoader(FakeTokenizer(), 2, 16, "train", source, rank=2, world_size=2)


def test_val_split_and_synthetic_long_documents():
    """Synthetic documents (~12k chars) span many rows; val rows differ from train rows."""
    src = resolve_source("synthetic")
    T = 256
    train = DistributedTokenLoader(FakeTokenizer(), 4, T, "train", src)
    val = DistributedTokenLoader(FakeTokenizer(), 4, T, "val", src)
    xs = torch.cat([train.next_batch()[0] for _ in range(11)])  # 44 rows = 11,264 tokens < 11,500 chars
    assert (xs == BOS).sum().item() == 1  # one document start: the first document spans all 44 rows
    assert not torch.equal(xs[:4], val.next_batch()[0])
    assert list(itertools.islice(iter(train), 2))[0][0].shape == (4, T)


# ------------------------------------------------------------------ source "recall": loss on the answers
class CharTokenizer(FakeTokenizer):
    """One token per char, each 1 byte: char offsets are token offsets (BOS, 0 bytes, first)."""

    def token_bytes(self):
        return torch.tensor([0 if i == BOS else 1 for i in range(BOS + 1)])


def test_recall_source_counts_every_answer_and_few_other_targets():
    from nanochat.dataset import iter_documents_with_answers, sized_for
    src = sized_for(resolve_source("recall"), 256)
    T, B = 256, 4
    loader = DistributedTokenLoader(CharTokenizer(), B, T, "train", src)
    x, y = loader.next_batch()
    stream = [BOS]
    answer = [False]
    for text, spans in itertools.islice(iter_documents_with_answers(src, "train"), 40):
        flags = [False] * len(text)
        for a, b in spans:
            flags[a:b] = [True] * (b - a)
        stream += [BOS] + [ord(c) % 997 + 1 for c in text]
        answer += [False] + flags
    stream, answer = torch.tensor(stream[1:]), torch.tensor(answer[1:])
    n = B * T
    torch.testing.assert_close(x.reshape(-1), stream[:n])  # inputs are every token
    yy, ans = y.reshape(-1), answer[1:n + 1]
    assert (yy[ans] == stream[1:n + 1][ans]).all() and ans.sum() > 20  # every answer target counts
    other = ~ans
    kept = (yy[other] != -1).float().mean().item()
    assert 0.03 < kept < 0.2  # RECALL_TARGET_KEEP = 0.1 of the rest
    assert ((yy == -1) | (yy == stream[1:n + 1])).all()
    # the same rows whatever the batch split (flags are drawn per document, not per batch)
    x2, y2 = zip(*(DistributedTokenLoader(CharTokenizer(), 2, T, "train", src, rank=r, world_size=2).next_batch()
                   for r in range(2)))
    torch.testing.assert_close(torch.cat(y2), y)
