"""Your own text on real prose: the shipped public-domain fixture (tests/fixtures/public_domain: Austen,
Lincoln, the KJV, the Declaration; dialogue, quotes, dashes, capitals) through the `--data_dir` source,
the tokenizer trainer and a short base_train run, instead of the synthetic generator's word lists."""

import os
import subprocess
import sys

from nanochat.dataset import documents_per_pass, iter_documents, resolve_source
from nanochat.tokenizer import get_tokenizer
from tests.test_base_train import REPO, TINY
from tests.test_tokenizer import _train_tok_on_dir

FIXTURE = os.path.join(REPO, "tests", "fixtures", "public_domain")


def fixture_texts() -> list[str]:
    names = sorted(n for n in os.listdir(FIXTURE) if n.endswith(".txt"))
    out = []
    for n in names:
        with open(os.path.join(FIXTURE, n), encoding="utf-8") as f:
            out.append(f.read())
    return out


def test_every_character_of_the_fixture_is_a_document_once():
    texts = fixture_texts()
    src = resolve_source(data_dir=FIXTURE)
    n = sum(src.doc_counts)
    assert n == len(texts) == 5  # each .txt under the piece cap is one whole document
    assert documents_per_pass(src, "val") == 1
    val = [next(iter_documents(src, "val"))]
    train = [d for _, d in zip(range(documents_per_pass(src, "train")), iter_documents(src, "train"))]
    assert "".join(val + train) == "".join(texts)


def test_tokenizer_trained_on_real_prose_round_trips_it(tmp_path, monkeypatch, capsys):
    seen, out = _train_tok_on_dir(FIXTURE, tmp_path, monkeypatch, capsys)
    texts = fixture_texts()
    assert "".join(seen) == "".join(texts[1:])  # file 0 (sorted) is the val document; the rest, each once
    tok = get_tokenizer()
    for text in texts:  # byte-level BPE: quotes, em dashes and line breaks come back exactly
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    held_out = texts[0]
    assert len(held_out) / len(tok.encode(held_out)) > 1.2  # ~40 merges learned on prose compress unseen prose (1.35)


def test_base_train_reads_the_fixture(tmp_path):
    base = tmp_path / "base"
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--data_dir", FIXTURE, "--vocab_size", "300"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY, "--data_dir", FIXTURE,
                        "--device_batch_size=4", "--num_iterations=6", "--model_tag=prose"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isdir(base / "base_checkpoints" / "prose")
    assert "Traceback" not in r.stderr
