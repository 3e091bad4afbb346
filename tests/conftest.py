"""Fixtures shared by the test modules."""

import pytest
import torch

from nanochat.synthetic import synthetic_texts
from nanochat.tokenizer import RustBPETokenizer


def train_tiny_tokenizer(vocab_size: int = 512) -> RustBPETokenizer:
    """A small BPE tokenizer on 60 synthetic-corpus excerpts (a second or two)."""
    texts = synthetic_texts("train")
    return RustBPETokenizer.train_from_iterator((next(texts)[:4000] for _ in range(60)), vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    """A NANOCHAT_BASE_DIR holding a small tokenizer (one per test module)."""
    base = tmp_path_factory.mktemp("nanochat_base")
    train_tiny_tokenizer().save(str(base / "tokenizer"))
    return base


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine OpenMP threads that spin
    waiting for each other make a step 10-100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
