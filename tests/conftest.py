"""Fixtures shared by the test modules, and a check that the suite runs on the torch mc_setup pins."""

import os
import re

import pytest
import torch

from nanochat.synthetic import synthetic_texts
from nanochat.tokenizer import RustBPETokenizer


def pytest_configure(config):
    """Statistical tests were checked over many seeds on the pinned CPU torch; another build changes the
    float kernels and so the training trajectories. Refuse it loudly instead of going red by chance.
    (The check is for CPU builds; uv.lock pins the CUDA build to the same version.)"""
    setup = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "mc_setup")).read()
    pin = re.search(r"^TORCH_PIN=(\S+)", setup, re.M).group(1)
    have = torch.__version__.split("+")[0]
    if torch.version.cuda is None and have != pin:
        raise pytest.UsageError(f"the test suite runs on torch {have}, but mc_setup pins {pin} for CPU: "
                                f"run ./mc_setup --dev (or bash dev/test.sh), which installs it into .venv")


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
