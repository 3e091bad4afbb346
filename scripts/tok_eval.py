"""
Evaluate the trained tokenizer's compression: bytes of UTF-8 text per token (higher = fewer tokens
for the same text = longer effective context), side by side with GPT-2 and GPT-4 (cl100k_base).

Samples: a news-like paragraph, Python code, LaTeX-ish math, and one validation document of the
chosen text source (default: the synthetic long-context corpus). GPT-2/GPT-4 encodings come from
tiktoken, which downloads them on first use; offline, that column is skipped with a note.
Prints a markdown table and logs a "Tokenizer evaluation" report section.

    python -m scripts.tok_eval [--source synthetic|fineweb|dir] [--data_dir DIR] [--doc_chars N]
"""

import argparse

import tiktoken

from nanochat import cli_checks as ck
from nanochat.dataset import SOURCES, iter_documents, resolve_source
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

NEWS_TEXT = """\
GENEVA (Reuters) - Delegates from 42 countries agreed on Thursday to a framework for sharing river-basin
data, ending three years of talks that had stalled over who would pay for monitoring stations. "It is not
everything we wanted, but it is a start," said Maria Okonkwo, the conference chair, adding that the first
stations could be running by March 2026. Critics said the deal's $1.8 billion budget was too small."""

CODE_TEXT = '''\
def moving_average(xs: list[float], k: int = 3) -> list[float]:
    """Mean of each window of k consecutive values."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        if i >= k - 1:
            out.append(acc / k)
    return out
'''

MATH_TEXT = r"""\
Let $f(x) = \sum_{n=0}^{\infty} \frac{x^n}{n!}$. Then $f'(x) = f(x)$ and $f(0) = 1$, so $f(x) = e^x$.
For the Gaussian integral, $\int_{-\infty}^{\infty} e^{-x^2}\,dx = \sqrt{\pi}$, hence
$\mathbb{E}[X^2] = \sigma^2 + \mu^2$ for $X \sim \mathcal{N}(\mu, \sigma^2)$; e.g. 3.14159 * 2 = 6.28318."""

REFERENCE_ENCODINGS = [("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")]


def load_reference_encodings():
    """[(label, encoding)] for the tiktoken encodings that can be loaded (they need the internet once)."""
    encs = []
    for label, name in REFERENCE_ENCODINGS:
        try:
            encs.append((label, tiktoken.get_encoding(name)))
        except Exception as e:
            print(f"note: skipping the {label} column: tiktoken could not load {name!r} "
                  f"(offline? {type(e).__name__})", flush=True)
    return encs


def compression_rows(samples, encoders):
    """rows[i] = {"text", "bytes", then per encoder label: (tokens, bytes_per_token)}."""
    rows = []
    for name, text in samples:
        n_bytes = len(text.encode("utf-8"))
        row = {"text": name, "bytes": n_bytes}
        for label, encode in encoders:
            n_tok = len(encode(text))
            row[label] = (n_tok, n_bytes / max(n_tok, 1))
        rows.append(row)
    return rows


def markdown_table(rows, labels):
    head = "| Text | Bytes | " + " | ".join(f"{lb} tokens | {lb} bytes/tok" for lb in labels) + " |"
    sep = "|" + "---|" * (2 + 2 * len(labels))
    lines = [head, sep]
    for r in rows:
        cells = [r["text"], f"{r['bytes']:,}"]
        for lb in labels:
            n_tok, ratio = r[lb]
            cells += [f"{n_tok:,}", f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenizer compression vs GPT-2/GPT-4", allow_abbrev=False)
    p.add_argument("--source", type=str, default="synthetic", choices=SOURCES,
                   help="text source for the validation-document sample")
    p.add_argument("--data_dir", type=str, default=None, help="--source fineweb: its shard folder; else a folder of your own files (implies --source dir)")
    p.add_argument("--doc_chars", type=ck.positive_int, default=20_000,
                   help="characters of the validation document used")
    args = p.parse_args(argv)
    if args.doc_chars <= 0:
        p.error(f"--doc_chars must be positive, got {args.doc_chars}")

    tokenizer = get_tokenizer()
    try:
        src = resolve_source(args.source, args.data_dir)
    except ValueError as e:  # missing/too little data: the message names the fix
        raise SystemExit(f"tok_eval: {e}") from None
    val_doc = next(iter(iter_documents(src, "val")), None)
    if not val_doc:
        raise SystemExit(f"tok_eval: source {args.source!r} has no validation documents; check --source/--data_dir")
    samples = [("news", NEWS_TEXT), ("code", CODE_TEXT), ("math", MATH_TEXT),
               (f"{args.source} val doc", val_doc[:args.doc_chars])]

    encoders = [(f"ours ({tokenizer.get_vocab_size():,})", tokenizer.encode)]
    encoders += [(label, enc.encode_ordinary) for label, enc in load_reference_encodings()]
    labels = [lb for lb, _ in encoders]
    rows = compression_rows(samples, encoders)
    table = markdown_table(rows, labels)
    print("\nCompression (bytes per token, higher is better):\n")
    print(table)

    get_report().log(section="Tokenizer evaluation", data=[
        {"vocab_size": tokenizer.get_vocab_size(), "source": args.source,
         "compared_with": ", ".join(labels[1:]) or "none (offline)"},
        "Compression in bytes per token (higher is better):\n\n" + table + "\n",
    ])

if __name__ == "__main__":
    main()
