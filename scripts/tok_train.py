"""
Train the project tokenizer (byte-level BPE via rustbpe) and save it to $NANOCHAT_BASE_DIR/tokenizer.

Reads up to --max_chars characters of training text from the train split of a nanochat.dataset text
source, each document fed to the BPE trainer in pieces of at most --doc_cap chars (cut at line breaks;
no text is dropped). A finite source (--source dir|fineweb) is read at most once: a folder smaller than
--max_chars is used whole, each character exactly once, and the log says how much that was. Then it
learns a vocab of exactly --vocab_size ids (BPE tokens + special tokens; if the text runs out of
merges first, reserved padding ids with a warning, or an error with --pad_vocab 0), writes tokenizer.pkl and
token_bytes.pt, checks an encode/decode roundtrip, and logs a "Tokenizer training" report section.

    python -m scripts.tok_train                                   # 65536 vocab, synthetic corpus
    python -m scripts.tok_train --vocab_size 4096 --max_chars 20000000   # CPU-sized
    python -m scripts.tok_train --source fineweb                  # downloaded FineWeb-Edu shards
    python -m scripts.tok_train --data_dir my_texts               # your own .txt/.jsonl/.parquet files

Next to the tokenizer it writes trained_on.txt ("synthetic", "fineweb", or "dir <folder>"), so run10.sh
retrains it when the recipe's text source changes.
"""

import argparse
import itertools
import os
import time

from nanochat import cli_checks as ck
from nanochat.common import str2bool
from nanochat.dataset import SOURCES, documents_per_pass, iter_documents, resolve_source
from nanochat.report import get_report
from nanochat.text_split import split_text
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, get_tokenizer_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the BPE tokenizer", allow_abbrev=False)
    p.add_argument("--vocab_size", type=ck.positive_int, default=65536, help="total vocab incl. special tokens")
    p.add_argument("--max_chars", type=ck.positive_int, default=2_000_000_000, help="max training characters")
    p.add_argument("--doc_cap", type=ck.positive_int, default=10_000,
                   help="longer documents are fed to the trainer in pieces of at most this many characters")
    p.add_argument("--source", type=str, default="synthetic", choices=SOURCES,
                   help="text source (see nanochat.dataset)")
    p.add_argument("--data_dir", type=str, default=None, help="--source fineweb: its shard folder; else a folder of your own files (implies --source dir)")
    p.add_argument("--pad_vocab", type=str2bool, default=True,
                   help="if the text runs out of merges before --vocab_size (the synthetic corpus has ~2.3k "
                        "distinct chunks), fill the rest with reserved never-used ids (1, with a warning) or fail (0)")
    args = p.parse_args(argv)
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if args.vocab_size < min_vocab:
        p.error(f"--vocab_size={args.vocab_size} is too small: need at least {min_vocab} "
                f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    if args.max_chars <= 0:
        p.error(f"--max_chars must be positive, got {args.max_chars}")
    if args.doc_cap <= 0:
        p.error(f"--doc_cap must be positive, got {args.doc_cap}")
    return args


def capped_texts(docs, max_chars, doc_cap, stats):
    """Yield the documents in pieces of at most doc_cap chars until max_chars total; counts go into stats.
    Pieces, not truncation: a long document's text all counts (a 30K-char chapter is not cut to 10K)."""
    for doc in docs:
        stats["docs"] += 1
        for piece in split_text(doc, doc_cap):
            stats["pieces"] += 1
            stats["chars"] += len(piece)
            yield piece
            if stats["chars"] >= max_chars:
                stats["stopped_at_max_chars"] = True
                return


def source_record(src) -> str:
    """What trained_on.txt says: the text source, and for a folder its real path."""
    return f"dir {os.path.realpath(src.data_dir)}" if src.kind == "dir" else src.kind


def main(argv=None):
    args = parse_args(argv)
    print(f"tok_train: vocab_size={args.vocab_size:,} max_chars={args.max_chars:,} doc_cap={args.doc_cap:,} "
          f"source={args.source}" + (f" data_dir={args.data_dir}" if args.data_dir else ""), flush=True)

    # ------------------------------------------------------------------ train
    try:
        src = resolve_source(args.source, args.data_dir)
    except ValueError as e:  # missing/too little data: the message names the fix
        raise SystemExit(f"tok_train: {e}") from None
    docs = iter_documents(src, "train")
    per_pass = documents_per_pass(src, "train")
    if per_pass is not None:  # a folder or shards: one pass, never the same text again (iter_documents loops)
        docs = itertools.islice(docs, per_pass)
    stats = {"docs": 0, "pieces": 0, "chars": 0, "stopped_at_max_chars": False}
    texts = capped_texts(docs, args.max_chars, args.doc_cap, stats)
    t0 = time.time()
    try:
        tokenizer = RustBPETokenizer.train_from_iterator(texts, args.vocab_size, pad_vocab=args.pad_vocab)
    except ValueError as e:  # e.g. too little text for the requested vocab: say so without a traceback
        if stats["docs"] == 0:
            raise SystemExit(f"tok_train: source {args.source!r} yielded no documents; check --source/--data_dir")
        raise SystemExit(f"tok_train: {e}") from e
    train_time = time.time() - t0
    if per_pass is None:
        extent = f"{stats['docs']:,} documents of the endless synthetic corpus, up to --max_chars"
    elif stats["stopped_at_max_chars"]:
        extent = f"{stats['docs']:,} of the {per_pass:,} train documents (stopped at --max_chars)"
    else:
        extent = f"all {per_pass:,} train documents, each once (the source holds less than --max_chars)"
    print(f"trained on {stats['chars']:,} chars: {extent}, fed as {stats['pieces']:,} pieces of at most "
          f"{args.doc_cap:,} chars, in {train_time:.2f}s", flush=True)
    n_learned = tokenizer.get_vocab_size() - len(SPECIAL_TOKENS) - tokenizer.num_reserved
    if tokenizer.num_reserved:
        print(f"WARNING: the text supports only {n_learned:,} BPE tokens; the last {tokenizer.num_reserved:,} of "
              f"{args.vocab_size:,} ids are reserved padding that never occurs in encoded text. For a smaller, "
              f"faster model use --vocab_size {n_learned + len(SPECIAL_TOKENS)} or less.", flush=True)

    # ------------------------------------------------------------------ save
    tok_dir = get_tokenizer_dir()
    tokenizer.save(tok_dir)
    with open(os.path.join(tok_dir, "trained_on.txt"), "w", encoding="utf-8") as f:
        f.write(source_record(src) + "\n")
    print(f"saved {os.path.join(tok_dir, 'tokenizer.pkl')} and token_bytes.pt", flush=True)

    # ------------------------------------------------------------------ sanity checks
    sample = "Hello world! The year 2024 had 366 days.\n\tcode: x = f(y) + 3.14159  # ok\nünïcödé 日本語 🙂"
    ids = tokenizer.encode(sample)
    decoded = tokenizer.decode(ids)
    if decoded != sample:
        raise SystemExit(f"tok_train: encode/decode roundtrip failed:\n{sample!r}\n!=\n{decoded!r}")
    print(f"roundtrip ok: {len(sample.encode('utf-8'))} bytes -> {len(ids)} tokens: "
          f"{[tokenizer.id_to_token(i) for i in ids[:16]]} ...", flush=True)
    token_bytes = tokenizer.token_bytes()
    regular = token_bytes[token_bytes > 0].float()
    print(f"vocab {tokenizer.get_vocab_size():,} ids ({n_learned:,} BPE, {len(SPECIAL_TOKENS)} special, "
          f"{tokenizer.num_reserved:,} reserved); token bytes of BPE tokens: "
          f"min {int(regular.min())}, max {int(regular.max())}, mean {regular.mean():.2f}", flush=True)

    # ------------------------------------------------------------------ report
    get_report().log(section="Tokenizer training", data=[
        vars(args),
        {"train_time_s": round(train_time, 2), "train_chars": stats["chars"], "train_docs": stats["docs"],
         "train_docs_per_pass": per_pass, "trained_on": source_record(src),
         "bpe_tokens_learned": n_learned, "reserved_padding_ids": tokenizer.num_reserved},
        {"vocab_size": tokenizer.get_vocab_size(), "num_special_tokens": len(SPECIAL_TOKENS),
         "token_bytes_min": int(regular.min()), "token_bytes_max": int(regular.max()),
         "token_bytes_mean": round(float(regular.mean()), 3)},
    ])

if __name__ == "__main__":
    main()
