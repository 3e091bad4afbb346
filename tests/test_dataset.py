"""
Tests for nanochat/dataset.py.

Downloads run against a local HTTP server (127.0.0.1, a thread) that serves fixture parquet shards,
honours Range requests, and can be told to fail, truncate or corrupt responses. Local-folder sources
use small parquet/jsonl/txt fixtures; FineWeb with no shards must fail with the fix in the message.
"""

import http.server
import io
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import (
    MAX_SHARD,
    TXT_DOC_CHARS,
    documents_per_pass,
    download_shards,
    iter_documents,
    list_parquet_files,
    resolve_source,
    shard_name,
)
from nanochat.synthetic import synthetic_document
from nanochat.text_split import split_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parquet_bytes(texts: list[str], row_group_size: int = 10) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=row_group_size)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Local shard server


class ShardHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: closing early = truncated body

    def log_message(self, *args):
        pass

    def do_GET(self):
        st = self.server.state
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        st["requests"].append((name, rng))
        if name not in st["files"]:
            self.send_error(404)
            return
        if st["fail"].get(name, 0) > 0:
            st["fail"][name] -= 1
            self.send_error(503, "try later")
            return
        data = st["files"][name]
        if name in st["corrupt"]:
            data = bytes(b ^ 0x5A for b in data)  # same length, not parquet
        start = 0
        if rng:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in st["stall"] and not rng:  # send the first bytes, then hang until released (or the client dies)
            self.wfile.write(body[:st["stall"][name]])
            self.wfile.flush()
            st["release"].wait(30)
            try:
                self.wfile.write(body[st["stall"][name]:])
            except OSError:
                pass
            return
        if st["truncate"].get(name, 0) > 0:  # announce the full length, send half, hang up
            st["truncate"][name] -= 1
            body = body[:len(body) // 2]
        self.wfile.write(body)


@pytest.fixture
def server():
    files = {shard_name(i): parquet_bytes([f"shard {i} doc {j} " * 20 for j in range(30)])
             for i in (0, 1, 2, MAX_SHARD)}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    srv.state = {"files": files, "fail": {}, "truncate": {}, "corrupt": set(), "requests": [], "stall": {},
                 "release": threading.Event()}
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.state["release"].set()
    srv.shutdown()
    srv.server_close()


def fetch(server, tmp_path, n=2, **kw):
    return download_shards(n, data_dir=str(tmp_path), workers=2, base_url=server.url, backoff=0.01, timeout=10, **kw)


def test_download_parallel(server, tmp_path):
    paths = fetch(server, tmp_path, n=3)
    assert [os.path.basename(p) for p in paths] == [shard_name(0), shard_name(1), shard_name(MAX_SHARD)]
    for p in paths:
        assert open(p, "rb").read() == server.state["files"][os.path.basename(p)]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]
    assert list_parquet_files(str(tmp_path)) == paths
    n_requests = len(server.state["requests"])
    fetch(server, tmp_path, n=3)  # already there and valid: nothing fetched again
    assert len(server.state["requests"]) == n_requests


def test_resume_partial_file(server, tmp_path):
    name = shard_name(0)
    data = server.state["files"][name]
    half = len(data) // 2
    (tmp_path / (name + ".part")).write_bytes(data[:half])
    fetch(server, tmp_path)
    assert (name, f"bytes={half}-") in server.state["requests"]
    assert (tmp_path / name).read_bytes() == data


def test_retry_after_server_failure(server, tmp_path):
    name = shard_name(0)
    server.state["fail"][name] = 2
    fetch(server, tmp_path)
    assert [r for r in server.state["requests"] if r[0] == name] == [(name, None)] * 3
    assert (tmp_path / name).read_bytes() == server.state["files"][name]


def test_truncated_response_is_resumed(server, tmp_path):
    """Fewer bytes than Content-Length: the shard is not accepted; the next attempt resumes with Range."""
    name = shard_name(MAX_SHARD)
    server.state["truncate"][name] = 1
    fetch(server, tmp_path)
    reqs = [r for r in server.state["requests"] if r[0] == name]
    assert reqs[0] == (name, None) and reqs[1][1] is not None and reqs[1][1].startswith("bytes=")
    assert (tmp_path / name).read_bytes() == server.state["files"][name]


def test_always_truncated_never_lands_under_final_name(server, tmp_path):
    name = shard_name(MAX_SHARD)
    server.state["truncate"][name] = 100
    with pytest.raises(RuntimeError, match=name):
        fetch(server, tmp_path, retries=3)
    assert not (tmp_path / name).exists()
    assert (tmp_path / shard_name(0)).exists()  # the healthy shard still landed


def test_corrupt_shard_rejected_and_deleted(server, tmp_path):
    name = shard_name(0)
    server.state["corrupt"].add(name)
    with pytest.raises(RuntimeError, match="not valid parquet"):
        fetch(server, tmp_path, retries=2)
    assert not (tmp_path / name).exists() and not (tmp_path / (name + ".part")).exists()


def test_invalid_existing_file_is_refetched(server, tmp_path):
    name = shard_name(0)
    (tmp_path / name).write_bytes(b"PAR1 not really parquet")
    fetch(server, tmp_path)
    assert (tmp_path / name).read_bytes() == server.state["files"][name]


def test_complete_part_file_is_accepted(server, tmp_path):
    """A .part that is already complete (crash before the rename): the server answers 416 to the Range."""
    name = shard_name(0)
    (tmp_path / (name + ".part")).write_bytes(server.state["files"][name])
    fetch(server, tmp_path)
    assert (tmp_path / name).read_bytes() == server.state["files"][name]


def test_missing_shard_fails_fast(server, tmp_path):
    del server.state["files"][shard_name(0)]
    with pytest.raises(RuntimeError, match="HTTP 404"):
        fetch(server, tmp_path, retries=5)
    assert len([r for r in server.state["requests"] if r[0] == shard_name(0)]) == 1


def test_sigkilled_download_resumes(server, tmp_path):
    """A real `python -m nanochat.dataset` SIGKILLed in the middle of a shard: the final name never appears,
    the bytes that reached the disk stay in the .part, and the next run resumes it with a Range request."""
    name = shard_name(0)
    rng = random.Random(0)
    data = parquet_bytes([rng.randbytes(40_000).hex() for _ in range(40)])  # ~3 MB, incompressible
    server.state["files"][name] = data
    server.state["stall"][name] = len(data) * 3 // 4
    part = tmp_path / (name + ".part")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.dataset", "-n", "2", "-w", "1", "--retries", "1",
                             "--base_url", server.url, "--data_dir", str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (part.exists() and part.stat().st_size >= 1 << 20):  # the downloader writes 1 MiB reads
        assert proc.poll() is None and time.time() - t0 < 60, "the download never got going"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    server.state["stall"].clear()
    server.state["release"].set()
    have = part.stat().st_size
    assert 0 < have < len(data) and not (tmp_path / name).exists()
    fetch(server, tmp_path)
    assert (name, f"bytes={have}-") in server.state["requests"]
    assert (tmp_path / name).read_bytes() == data and not part.exists()


def test_cli_and_bad_counts(server, tmp_path):
    dataset.main(["-n", "2", "-w", "1", "--base_url", server.url, "--data_dir", str(tmp_path)])
    assert len(list_parquet_files(str(tmp_path))) == 2
    for bad in (0, 1, MAX_SHARD + 2):
        with pytest.raises(ValueError, match="num_shards"):
            download_shards(bad, data_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Sources


@pytest.fixture
def user_dir(tmp_path):
    """a.parquet: 150 docs (g 0..149), b.jsonl: 60 docs (g 150..209), c.txt: 1 doc (g 210)."""
    d = tmp_path / "mydata"
    d.mkdir()
    (d / "a.parquet").write_bytes(parquet_bytes([f"p{i}" for i in range(150)], row_group_size=16))
    lines = [json.dumps({"text": f"j{i}", "id": i}) for i in range(60)]
    lines.insert(10, "")  # blank lines are not documents
    (d / "b.jsonl").write_text("\n".join(lines) + "\n")
    (d / "c.txt").write_text("first paragraph\n\nsecond paragraph of the same document\n")
    (d / "notes.md").write_text("ignored")
    return d


def take(it, n):
    return list(itertools.islice(it, n))


def test_dir_source_splits(user_dir):
    src = resolve_source(data_dir=str(user_dir))  # a data_dir implies source "dir"
    assert src.kind == "dir" and [os.path.basename(f) for f in src.files] == ["a.parquet", "b.jsonl", "c.txt"]
    every = [f"p{i}" for i in range(150)] + [f"j{i}" for i in range(60)] + ["first paragraph\n\nsecond "
                                                                            "paragraph of the same document\n"]
    val = [t for g, t in enumerate(every) if g % 100 == 0]
    train = [t for g, t in enumerate(every) if g % 100 != 0]
    assert val == ["p0", "p100", "j50"]
    assert take(iter_documents(src, "val"), 7) == val + val + val[:1]  # endless: epochs repeat
    assert take(iter_documents(src, "train"), len(train) + 3) == train + train[:3]
    assert train[-1] == every[-1]  # the .txt file is one whole document
    for split, docs in (("train", train), ("val", val)):
        looped = docs * 100
        for start in (0, 1, 5, 98, 99, 100, 148, 149, 150, len(docs) - 1, len(docs), len(docs) + 7):
            assert take(iter_documents(src, split, start=start), 4) == looped[start:start + 4], (split, start)


def test_dir_source_errors(tmp_path, user_dir):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope"))):
        resolve_source("dir", str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*no .parquet/.jsonl/.txt"):
        resolve_source("dir", str(empty))
    with pytest.raises(ValueError, match="--data_dir"):
        resolve_source("dir", None)
    with pytest.raises(ValueError, match="unknown data source"):
        resolve_source("webtext")
    (user_dir / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    src = resolve_source("dir", str(user_dir))
    with pytest.raises(ValueError, match=r"d\.jsonl:2"):
        take(iter_documents(src, "train"), 300)
    with pytest.raises(ValueError, match="split"):
        next(iter_documents(src, "test"))


def book_text(n_chars: int, seed: int = 0) -> str:
    """Paragraphs of pseudo-words (blank lines between, line breaks inside), about n_chars long."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    paras, size = [], 0
    while size < n_chars:
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))) for _ in range(rng.randint(1, 12))]
        paras.append("\n".join(lines))
        size += len(paras[-1]) + 2
    return "\n\n".join(paras) + "\n"


def test_split_text_is_lossless_and_prefers_breaks():
    text = book_text(50_000)
    for cap in (1, 7, 100, 999, 4096, 49_999, 60_000):
        pieces = split_text(text, cap)
        assert "".join(pieces) == text, cap
        assert all(0 < len(p) <= cap for p in pieces), cap
        assert all(len(p) > cap // 4 for p in pieces[:-1]), cap
    pieces = split_text(text, 4096)
    assert all(p.endswith("\n\n") for p in pieces[:-1])  # paragraph breaks here are never far apart
    one_line = "x" * 10_000
    assert split_text(one_line, 3000) == ["x" * 2500] * 4  # no break in reach: even hard cuts, no tiny tail
    assert split_text("a\nb", 10) == ["a\nb"] and split_text("", 10) == []
    with pytest.raises(ValueError):
        split_text("abc", 0)


def test_dir_source_one_book(tmp_path):
    """One .txt of a few hundred KB: documents of at most TXT_DOC_CHARS, the whole text, every character once
    per pass (val + train pieces put back in order give the book), and a train split to read."""
    text = book_text(300_000)
    (tmp_path / "book.txt").write_text(text)
    src = resolve_source("dir", str(tmp_path))
    n = sum(src.doc_counts)
    assert n == len(split_text(text, TXT_DOC_CHARS)) and n >= 5
    assert documents_per_pass(src, "train") == n - 1 and documents_per_pass(src, "val") == 1
    val = take(iter_documents(src, "val"), 1)
    train = take(iter_documents(src, "train"), n - 1)
    assert "".join(val + train) == text  # g = 0 is val; the rest, in order, is train
    assert all(len(d) <= TXT_DOC_CHARS for d in val + train)
    assert take(iter_documents(src, "train", start=n - 1), 1) == train[:1]  # the next pass starts over
    assert take(iter_documents(src, "train", start=2), 2) == train[2:4]  # resume skips whole pieces
    assert documents_per_pass(resolve_source("synthetic"), "train") is None  # endless


def test_dir_source_several_files_read_completely(tmp_path):
    texts = [book_text(30_000, seed=i) for i in range(5)] + [book_text(150_000, seed=9)]
    for i, t in enumerate(texts):
        (tmp_path / f"ch{i}.txt").write_text(t)
    src = resolve_source("dir", str(tmp_path))
    assert src.doc_counts == [1] * 5 + [len(split_text(texts[-1], TXT_DOC_CHARS))]
    n = sum(src.doc_counts)
    docs = take(iter_documents(src, "val"), 1) + take(iter_documents(src, "train"), n - 1)
    assert "".join(docs) == "".join(texts)  # no 10,000-char (or any) truncation


def test_dir_source_too_little_text_is_one_clear_error(tmp_path):
    (tmp_path / "short.txt").write_text("just a few lines\n" * 100)
    with pytest.raises(ValueError, match=r"holds 1 document\(s\).*need at least 2.*add text.*\.txt over 64,000"):
        resolve_source("dir", str(tmp_path))


def test_fineweb_without_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"no FineWeb shards in .*base_data: run python -m nanochat\.dataset -n 8"):
        resolve_source("fineweb")
    with pytest.raises(ValueError, match="no FineWeb shards"):
        resolve_source("fineweb", str(tmp_path / "elsewhere"))


def test_fineweb_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    shard_dir = tmp_path / "base_data"
    shard_dir.mkdir()
    texts = {i: [f"s{i}-{j}" for j in range(25)] for i in (0, 1, MAX_SHARD)}
    for i, t in texts.items():
        (shard_dir / shard_name(i)).write_bytes(parquet_bytes(t, row_group_size=7))
    (shard_dir / (shard_name(2) + ".part")).write_bytes(b"partial download, ignored")
    src = resolve_source("fineweb")
    assert src.kind == "fineweb" and len(src.files) == 3
    train, val = texts[0] + texts[1], texts[MAX_SHARD]
    assert take(iter_documents(src, "val"), 26) == val + val[:1]
    assert take(iter_documents(src, "train"), 51) == train + train[:1]
    for start in (3, 7, 24, 25, 33, 50, 64):
        assert take(iter_documents(src, "train", start=start), 3) == (train * 3)[start:start + 3]
    (shard_dir / shard_name(1)).unlink()
    (shard_dir / shard_name(0)).unlink()
    with pytest.raises(ValueError, match="only one FineWeb shard"):
        resolve_source("fineweb")


def test_synthetic_default_and_announcement(monkeypatch, capsys):
    monkeypatch.setattr(dataset, "_announced", set())
    src = resolve_source()
    assert src.kind == "synthetic"
    assert next(iter_documents(src, "train", start=4)) == synthetic_document(4, "train").text
    assert next(iter_documents(src, "val")) == synthetic_document(0, "val").text
    out = capsys.readouterr().out
    assert out.count("data source: synthetic long-context corpus (offline default") == 1


def test_recall_source_is_the_dense_synthetic_corpus(monkeypatch, capsys):
    monkeypatch.setattr(dataset, "_announced", set())
    src = resolve_source("recall")
    assert (src.kind, src.density) == ("synthetic", "dense")
    assert next(iter_documents(src, "train", start=2)) == synthetic_document(2, "train", density="dense").text
    assert "dense in passkeys" in capsys.readouterr().out
    with pytest.raises(ValueError, match="recall"):  # the error lists the sources
        resolve_source("nope")
