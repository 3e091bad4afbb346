"""
split_text(): cut a long text into consecutive pieces of at most `cap` characters, losslessly
("".join(pieces) == text), preferring paragraph breaks, then line breaks, over a cut mid-line.

Used where a whole file or document is too big to be one unit: the dir source's .txt files (one
book becomes several documents, so it has both a train and a val split) and tok_train's --doc_cap
(a long document is fed to the BPE trainer in pieces instead of being truncated).
"""


def _even_target(rest: int, cap: int) -> int:
    """Piece size that splits `rest` chars into the fewest pieces of at most cap, evenly: no tiny tail
    piece (a 64,010-char text becomes two ~32K pieces, not 64,000 + 10)."""
    pieces = -(-rest // cap)
    return -(-rest // pieces)


def split_text(text: str, cap: int) -> list[str]:
    """Consecutive pieces of at most cap chars. Each cut lies in the second half of an even share of what is
    left (at least cap/2), so no piece but the last is shorter than cap/4. An empty text gives no pieces."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    pieces, start, n = [], 0, len(text)
    while n - start > cap:
        target = _even_target(n - start, cap)
        lo, hi = start + target // 2, start + target
        cut = text.rfind("\n\n", lo, hi)
        if cut >= 0:
            cut += 2  # the blank line stays with the paragraph it ends
        else:
            cut = text.rfind("\n", lo, hi)
            cut = cut + 1 if cut >= 0 else hi  # no line break in reach (e.g. one huge line): cut anyway
        pieces.append(text[start:cut])
        start = cut
    if start < n:
        pieces.append(text[start:])
    return pieces
