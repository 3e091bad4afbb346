"""
Pretraining text sources. Every consumer asks `resolve_source()` for a `TextSource` and then reads
documents with `iter_documents(src, split, start)`. Three kinds:

synthetic (default, offline)  nanochat/synthetic.py's long-context corpus. Splits "train", "val" and
    "test" are disjoint seed streams; each is endless.

recall    the same corpus at density "dense": a recall drill, ~3x the passkeys and key=value facts per
    char, each recalled 2-3 times at >= ~64 tokens (nanochat/synthetic.py), with the loss mostly on the
    recalled values: every answer token counts, other tokens count with probability RECALL_TARGET_KEEP
    (the loader marks the rest -1, deterministic per document). Measured on CPU (lab notebook): with
    every token counted, filler and the random digits of the statements drown the answers' gradient
    and no recall circuit forms in minutes. Documents are sized to the training window
    (sized_for(src, T)), so a fact and its recalls mostly share a row.

fineweb   FineWeb-Edu shards (parquet, column "text") in $NANOCHAT_BASE_DIR/base_data, fetched with
    `python -m nanochat.dataset -n N`. N shards = train shards 0..N-2 plus the val shard 01822, the
    last shard of the dataset. Split rule: val = the highest-numbered shard present, train = all
    others, so with shards from this downloader val is always shard_01822 and downloading more later
    never moves a document between splits.

dir       your own files: `--data_dir DIR` with *.parquet (column "text"), *.jsonl (one JSON object
    per non-blank line, field "text") and *.txt (a whole file, read completely; one longer than
    TXT_DOC_CHARS is cut into consecutive documents of at most that size at paragraph or line breaks,
    nanochat/text_split.py, so one book still has a train and a val split; pieces of 16K-64K chars
    stay long, as MegaContext wants, and consecutive pieces of a file follow each other in the token
    stream). Only files directly in DIR are read, in sorted filename order, documents in file order;
    that gives every document a global index g. Split rule: val = documents with g % 100 == 0 (the first document and every
    100th after it), train = all the others. So a folder needs at least 2 documents.

Finite sources (fineweb, dir) loop: after the last document of a split, iteration starts again at
its first (epoch 2, same order). `start` counts documents of that split across epochs, so
iter_documents(src, split, start=k) yields exactly what the (k+1)-th next() of an iteration from 0
would, without reading the skipped text (parquet row groups are skipped by their metadata).

Downloads (urllib, no extra dependency) run in a thread pool, resume a partial `<shard>.part` with
an HTTP Range request, retry with exponential backoff (backoff * 2^attempt seconds), and accept a
shard only if its size equals the announced length and it opens as parquet with a "text" column;
only then is it renamed (atomic os.replace) to its final name. A bad file is never left there.
"""

import argparse
import dataclasses
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow.parquet as pq

from nanochat.common import get_base_dir, print0
from nanochat.synthetic import synthetic_document, synthetic_texts
from nanochat.text_split import split_text

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822          # shards are shard_00000 ... shard_01822; the last one is the val split
VAL_EVERY = 100           # dir source: document g is val iff g % VAL_EVERY == 0
DIR_EXTENSIONS = (".parquet", ".jsonl", ".txt")
# dir source: a .txt longer than this becomes several documents. 64K chars is ~15K tokens: long enough
# for mc_eval's --doc_tokens=8192 on your own text, short enough that one 300 KB book gives 5 documents.
TXT_DOC_CHARS = 64_000


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def default_data_dir() -> str:
    return os.path.join(get_base_dir(), "base_data")


def list_parquet_files(data_dir=None) -> list[str]:
    """Sorted full paths of the *.parquet files in data_dir (default: the FineWeb shard folder)."""
    data_dir = data_dir or default_data_dir()
    if not os.path.isdir(data_dir):
        return []
    return sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))


# --------------------------------------------------------------------------------------------------
# Download


def _parquet_problem(path: str) -> str | None:
    """None if `path` opens as parquet with a "text" column and at least one row, else the reason."""
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            return f"no 'text' column (columns: {pf.schema_arrow.names})"
        if pf.metadata.num_rows == 0:
            return "no rows"
    except Exception as e:  # pyarrow raises several types for truncated/garbage files
        return f"{type(e).__name__}: {e}"
    return None


def _content_range_total(header: str | None) -> int | None:
    """Total size from 'bytes 100-199/5000' or 'bytes */5000'."""
    m = re.search(r"/(\d+)\s*$", header or "")
    return int(m.group(1)) if m else None


def _fetch_once(url: str, part: str, timeout: float) -> int | None:
    """One HTTP attempt that leaves `part` as complete as it got. Resumes from the bytes already in
    `part` with a Range request. Returns the file's announced total size (None if not announced);
    raises OSError if fewer bytes arrived than announced."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "nanochat-megacontext/0.1"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left past `offset`: part may already be complete
            return _content_range_total(e.headers.get("Content-Range"))
        raise
    with resp:
        if offset and resp.status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise OSError(f"server resumed at the wrong offset ({resp.headers.get('Content-Range')!r})")
            total = _content_range_total(resp.headers.get("Content-Range"))
            mode = "ab"
        else:  # plain 200: the server sends the whole file, start the part over
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        with open(part, mode) as f:
            try:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
            except http.client.IncompleteRead as e:  # connection closed early: keep what arrived
                f.write(e.partial)
                raise OSError(f"connection closed early: {e}") from e
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise OSError(f"size mismatch: have {size} bytes, server announced {total}")
    return total


def download_shard(index: int, data_dir: str, base_url: str = BASE_URL, retries: int = 5,
                   backoff: float = 2.0, timeout: float = 60.0) -> str:
    """Fetch one shard into data_dir (skip if a valid copy exists). Returns its final path."""
    name = shard_name(index)
    final = os.path.join(data_dir, name)
    part = final + ".part"
    if os.path.exists(final):
        problem = _parquet_problem(final)
        if problem is None:
            return final
        print0(f"{name}: existing file is invalid ({problem}); deleting it and downloading again")
        os.remove(final)
    url = f"{base_url.rstrip('/')}/{name}"
    last_error = None
    for attempt in range(retries):
        try:
            total = _fetch_once(url, part, timeout)
            problem = _parquet_problem(part)
            if problem is not None:
                os.remove(part)  # complete but unreadable: the next attempt starts from zero
                raise OSError(f"downloaded file is not valid parquet ({problem})")
            if total is not None and os.path.getsize(part) != total:
                raise OSError(f"size {os.path.getsize(part)} != announced {total}")
            os.replace(part, final)  # atomic: the final name only ever holds a validated file
            return final
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 416, 429):
                raise RuntimeError(f"{url}: HTTP {e.code} {e.reason}; check --base_url and the shard index") from e
            last_error = e
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, bad data
            last_error = e
        if attempt < retries - 1:
            delay = backoff * 2 ** attempt  # 2, 4, 8, 16 s by default
            print0(f"{name}: attempt {attempt + 1}/{retries} failed ({last_error}); retrying in {delay:.1f}s")
            time.sleep(delay)
    raise RuntimeError(f"{url}: failed after {retries} attempts: {last_error}")


def download_shards(num_shards: int, data_dir=None, workers: int = 4, base_url: str = BASE_URL,
                    retries: int = 5, backoff: float = 2.0, timeout: float = 60.0) -> list[str]:
    """Download `num_shards` FineWeb-Edu shards: train shards 0..num_shards-2 and the val shard
    MAX_SHARD (num_shards = -1 or MAX_SHARD+1: all). Returns the sorted final paths."""
    if num_shards == -1:
        num_shards = MAX_SHARD + 1
    if not 2 <= num_shards <= MAX_SHARD + 1:
        raise ValueError(f"num_shards must be in 2..{MAX_SHARD + 1} (one train shard plus the val shard) "
                         f"or -1 for all, got {num_shards}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    data_dir = data_dir or default_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    indices = list(range(num_shards - 1)) + [MAX_SHARD]
    print0(f"downloading {len(indices)} shards to {data_dir} with {workers} workers")
    paths, failures = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(download_shard, i, data_dir, base_url, retries, backoff, timeout): i for i in indices}
        for fut in as_completed(futures):
            try:
                paths.append(fut.result())
                print0(f"ok {shard_name(futures[fut])} [{len(paths)}/{len(indices)}]")
            except Exception as e:
                failures.append(f"{shard_name(futures[fut])}: {e}")
    if failures:
        raise RuntimeError(f"{len(failures)} shard(s) failed; run the same command again to resume:\n  "
                           + "\n  ".join(sorted(failures)))
    return sorted(paths)


# --------------------------------------------------------------------------------------------------
# Sources


@dataclass
class TextSource:
    """What every consumer asks for text. Build it with resolve_source()."""

    kind: str                     # "synthetic" | "fineweb" | "dir"
    data_dir: str | None = None
    files: list[str] = field(default_factory=list)
    doc_counts: list[int] = field(default_factory=list)  # documents per file (finite sources)
    seed: int = 0                 # synthetic only
    target_chars: int = 12000     # synthetic only
    density: str = "story"        # synthetic only: "story" (source synthetic) | "dense" (source recall)
    target_keep: float = 1.0      # fraction of non-answer targets in the loss (answers always count)
    description: str = ""


def _txt_documents(path: str) -> list[str]:
    """The documents of one .txt file: all of its text, in pieces of at most TXT_DOC_CHARS."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return split_text(f.read(), TXT_DOC_CHARS)


def _count_docs(path: str) -> int:
    """Documents in one file: parquet rows (from metadata), non-blank jsonl lines, .txt pieces."""
    if path.endswith(".parquet"):
        problem = _parquet_problem(path)
        if problem is not None:
            raise ValueError(f"{path}: unreadable parquet ({problem}); delete or fix the file")
        return pq.ParquetFile(path).metadata.num_rows
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return len(_txt_documents(path))


SOURCES = ("synthetic", "recall", "fineweb", "dir")  # the --source choices of every script
RECALL_TARGET_KEEP = 0.1  # source recall: share of non-answer targets that count in the loss
RECALL_CHARS_PER_TOKEN = 3.5  # source recall: documents of ~0.75 T tokens (4.7 chars per token)


def sized_for(src: "TextSource", T: int) -> "TextSource":
    """The source with recall documents sized to a T-token window (other sources unchanged)."""
    if src.density != "dense":
        return src
    return dataclasses.replace(src, target_chars=max(200, int(RECALL_CHARS_PER_TOKEN * T)))


def resolve_source(source: str = "synthetic", data_dir=None, seed: int = 0) -> TextSource:
    """Check that the requested data exists and describe it. A data_dir with the default source means
    source "dir"; with "fineweb" it is the shard folder. Missing data -> ValueError naming the fix."""
    if data_dir and source == "synthetic":
        source = "dir"
    if source == "synthetic":
        return TextSource("synthetic", seed=seed,
                          description=f"synthetic long-context corpus (offline default, seed {seed})")
    if source == "recall":
        return TextSource("synthetic", seed=seed, density="dense", target_keep=RECALL_TARGET_KEEP,
                          description=f"synthetic corpus, dense in passkeys and key=value recalls (seed {seed})")
    if source == "fineweb":
        d = data_dir or default_data_dir()
        files = list_parquet_files(d)
        if not files:
            raise ValueError(f"no FineWeb shards in {d}: run python -m nanochat.dataset -n 8")
        if len(files) < 2:
            raise ValueError(f"only one FineWeb shard in {d}; need a train shard and the val shard: "
                             f"run python -m nanochat.dataset -n 8")
        return TextSource("fineweb", d, files, [_count_docs(p) for p in files],
                          description=f"FineWeb-Edu, {len(files) - 1} train shards + val "
                                      f"{os.path.basename(files[-1])} in {d}")
    if source == "dir":
        if not data_dir:
            raise ValueError("source 'dir' needs --data_dir DIR (a folder of .parquet/.jsonl/.txt files)")
        if not os.path.isdir(data_dir):
            raise ValueError(f"data dir {data_dir} does not exist: create it and put .parquet (column 'text'), "
                             f".jsonl (field 'text') or .txt files in it, or drop --data_dir for the synthetic corpus")
        files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir)
                       if f.endswith(DIR_EXTENSIONS) and os.path.isfile(os.path.join(data_dir, f)))
        if not files:
            raise ValueError(f"data dir {data_dir} has no .parquet/.jsonl/.txt files: add some, "
                             f"or drop --data_dir for the synthetic corpus")
        counts = [_count_docs(p) for p in files]
        if sum(counts) < 2:
            raise ValueError(f"data dir {data_dir} holds {sum(counts)} document(s) ({sum(map(os.path.getsize, files)):,} "
                             f"bytes); need at least 2, one for val (every {VAL_EVERY}th document, starting with the "
                             f"first) and one for train: add text (another file, a .jsonl with one document per "
                             f"line, or a .txt over {TXT_DOC_CHARS:,} characters, which is cut into documents)")
        return TextSource("dir", data_dir, files, counts,
                          description=f"your files in {data_dir}: {len(files)} files, {sum(counts):,} documents "
                                      f"(val = every {VAL_EVERY}th document from the first)")
    raise ValueError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")


def _iter_file(path: str, skip: int = 0) -> Iterator[str]:
    """The documents of one file in order, after skipping the first `skip` (parquet: by row group)."""
    if path.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if skip >= n:
                skip -= n
                continue
            texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            yield from (t or "" for t in texts[skip:])
            skip = 0
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if skip:
                    skip -= 1
                    continue
                try:
                    text = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError) as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({e}); fix or remove the line") from e
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: no string field 'text'; each line needs {{\"text\": ...}}")
                yield text
    else:
        yield from _txt_documents(path)[skip:]


def _iter_from(files: list[str], counts: list[int], start: int) -> Iterator[tuple[int, str]]:
    """(global index, text) for the documents of `files` from global index `start` to the end."""
    base = 0
    for path, n in zip(files, counts):
        if start < base + n:
            for j, text in enumerate(_iter_file(path, max(0, start - base))):
                yield base + max(0, start - base) + j, text
        base += n


def _split_size(src: TextSource, split: str) -> int:
    """Documents in one epoch of the split."""
    if src.kind == "fineweb":
        return src.doc_counts[-1] if split == "val" else sum(src.doc_counts[:-1])
    n = sum(src.doc_counts)
    n_val = (n + VAL_EVERY - 1) // VAL_EVERY  # g = 0, 100, 200, ... < n
    return n_val if split == "val" else n - n_val


def documents_per_pass(src: TextSource, split: str) -> int | None:
    """Documents in one pass over a finite source's split (iter_documents then repeats them); None for
    the endless synthetic corpus. Lets a consumer read each document once (tok_train)."""
    return None if src.kind == "synthetic" else _split_size(src, split)


def _iter_split_once(src: TextSource, split: str, j: int) -> Iterator[str]:
    """Documents j, j+1, ... of one epoch of a finite source's split."""
    if src.kind == "fineweb":
        files, counts = (src.files[-1:], src.doc_counts[-1:]) if split == "val" else (src.files[:-1], src.doc_counts[:-1])
        yield from (text for _, text in _iter_from(files, counts, j))
        return
    # dir: val doc j is global 100j; train doc j is the j-th index with g % 100 != 0, i.e.
    # g = j + j // 99 + 1 (each block of 100 holds 99 train documents after its val document).
    g0 = VAL_EVERY * j if split == "val" else j + j // (VAL_EVERY - 1) + 1
    for g, text in _iter_from(src.files, src.doc_counts, g0):
        if (g % VAL_EVERY == 0) == (split == "val"):
            yield text


_announced: set = set()


def _check_split(src: TextSource, split: str, start: int):
    """Validate (split, start) for the source and announce the source once per process."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    valid = ("train", "val", "test") if src.kind == "synthetic" else ("train", "val")
    if split not in valid:
        raise ValueError(f"split {split!r} is not available for source {src.kind!r}; use one of {valid}")
    key = (src.kind, src.data_dir, src.seed, src.density)
    if key not in _announced:
        _announced.add(key)
        print0(f"data source: {src.description or src.kind}")


def iter_documents(src: TextSource, split: str, start: int = 0) -> Iterator[str]:
    """Endless deterministic stream of document strings of `split`, from split document `start`.
    Finite sources repeat epoch after epoch in the same order. Val never overlaps train."""
    _check_split(src, split, start)
    if src.kind == "synthetic":
        yield from synthetic_texts(split, src.seed, start, src.target_chars, src.density)
        return
    yield from _iter_finite(src, split, start)


def iter_documents_with_answers(src: TextSource, split: str, start: int = 0) -> Iterator[tuple[str, list]]:
    """(text, [(answer char start, end), ...]) per document: the recalled values of synthetic documents,
    no spans for other sources. What the loader needs for target_keep < 1."""
    if src.kind != "synthetic":
        for text in iter_documents(src, split, start):
            yield text, []
        return
    _check_split(src, split, start)
    index = start
    while True:
        doc = synthetic_document(index, split, src.seed, src.target_chars, src.density)
        yield doc.text, [(r.answer_start, r.answer_end) for r in doc.recalls]
        index += 1


def _iter_finite(src: TextSource, split: str, start: int) -> Iterator[str]:
    n = _split_size(src, split)
    if n == 0:
        raise ValueError(f"source {src.description} has no {split} documents; add more data")
    j = start % n  # epoch = start // n; every epoch has the same order
    while True:
        yield from _iter_split_once(src, split, j)
        j = 0


# --------------------------------------------------------------------------------------------------
# CLI: python -m nanochat.dataset -n 8


def main(argv=None):
    p = argparse.ArgumentParser(description="Download FineWeb-Edu shards (train 0..N-2 + val shard 01822).",
                                allow_abbrev=False)
    p.add_argument("-n", "--num_shards", type=int, default=8, help="shards to download, -1 = all (default 8)")
    p.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads (default 4)")
    p.add_argument("--base_url", type=str, default=BASE_URL, help="where shard_XXXXX.parquet files live")
    p.add_argument("--data_dir", type=str, default=None, help="destination (default $NANOCHAT_BASE_DIR/base_data)")
    p.add_argument("--retries", type=int, default=5, help="attempts per shard (default 5)")
    args = p.parse_args(argv)
    try:
        paths = download_shards(args.num_shards, args.data_dir, args.workers, args.base_url, args.retries)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{len(paths)} shards ready in {os.path.dirname(paths[0])}")


if __name__ == "__main__":
    main()
