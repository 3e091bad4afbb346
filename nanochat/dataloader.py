"""
Distributed tokenizing data loader: text documents in, [B, T] batches of (inputs, targets) out.

The global token stream. Documents come from nanochat.dataset.iter_documents(source, split) in
their deterministic order; each is tokenized with BOS prepended, and the token lists are
concatenated into one stream S (no padding, no separators other than BOS):

    S = [BOS] doc0 [BOS] doc1 [BOS] doc2 ...

Packing rule (rows). Global row g is the window S[g*T : g*T + T + 1], T+1 tokens; consecutive
rows overlap by exactly one token. Row g gives x = row[:-1] = S[g*T : (g+1)*T] and
y = row[1:] = S[g*T+1 : (g+1)*T+1]. So the x windows tile S without gaps or overlap, every token
of S after the first is a target exactly once, and a document longer than T simply continues into
row g+1 — long documents span consecutive rows, which MegaContext needs. Rows do not start at
document boundaries; BOS tokens inside a row mark where a new document begins.

Which rows a rank gets. Calls to next_batch() on rank r return chunks c = 0, 1, 2, ... of B rows:

    chunk c of rank r = global rows [c*world*B + r*B, c*world*B + (r+1)*B)

The training loop calls next_batch() grad_accum times per optimizer step, so micro-batch k of
step n is chunk c = n*grad_accum + k, whose first row is
    (n*grad_accum + k)*world*B + r*B = n*R + (k*world + r)*B,   with R = B*world*grad_accum,
exactly the alignment contract in dev/INTERFACES.md: optimizer step n consumes global rows
[n*R, (n+1)*R) however R is split into B, world size and grad_accum.

Loss targets. With source.target_keep < 1 (source "recall") the stream also carries a flag per token:
"this token counts as a target". Answer tokens (the tokens overlapping the recalled values' chars, from
nanochat.dataset.iter_documents_with_answers) always count; every other token counts with probability
target_keep, drawn from a generator seeded by the document index (deterministic, resumable, the same on
every rank). y is -1 (ignored by the loss) where the flag is off; x is unchanged. Plain sources: every
flag is on, y = x shifted.

Every rank walks the whole stream (tokenizing all documents, keeping only its own rows), because
where a row starts depends on the token counts of every document before it. Tokenization runs in
batches of DOCS_PER_ENCODE documents; the buffer holds only tokens from the current position on.

Resuming. state_dict() records rows_done = chunks*world*B (global rows consumed by all ranks
together) and a cursor: the document index and token offset (within [BOS]+tokens of that document)
where this rank's next unread row starts, and that row's global index. A resumed loader starts the
document iterator at the cursor's document (documents before it are never read or tokenized) and
continues exactly. Because the cursor lies at or before the next row any rank needs, the state of
any rank can resume any rank, even with a different B or world size, as long as rows_done is a
multiple of the new world*B; T must be unchanged.
"""

from collections import deque

import numpy as np
import torch

from nanochat.dataset import TextSource, iter_documents_with_answers

DOCS_PER_ENCODE = 64  # documents per tokenizer.encode call (batched for speed)
STATE_VERSION = 1


class DistributedTokenLoader:
    """Endless [B, T] (x, y) batches for one rank; see the module docstring for the exact rows."""

    def __init__(self, tokenizer, B: int, T: int, split: str, source: TextSource, rank: int = 0,
                 world_size: int = 1, device="cpu", state: dict | None = None):
        if B < 1 or T < 1:
            raise ValueError(f"need B >= 1 and T >= 1, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..world_size-1 (world_size={world_size})")
        self.tokenizer, self.B, self.T, self.split, self.source = tokenizer, B, T, split, source
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.bos = tokenizer.get_bos_token_id()
        # per-token byte lengths, to place answer chars on tokens (only when the loss skips targets)
        self._token_bytes = np.asarray(tokenizer.token_bytes()) if source.target_keep < 1 else None
        doc_index, token_offset, cursor_row, rows_done = 0, 0, 0, 0
        if state is not None:
            doc_index, token_offset, cursor_row, rows_done = self._check_state(state)
        self.chunk = rows_done // (world_size * B)  # next chunk this rank returns
        # Buffer: tokens S[buf_start : buf_start + buf_len], kept as a deque of [2, n] numpy arrays
        # (row 0 the token ids, row 1 the "counts as a target" flag).
        self._docs = iter_documents_with_answers(source, split, start=doc_index)
        self._next_doc = doc_index                  # index of the next document to tokenize
        self._bounds: deque = deque()               # (stream position where a doc starts, doc index)
        self._pieces: deque = deque()               # numpy int64 arrays, in stream order
        self._buf_start = cursor_row * T - token_offset  # S position of the first buffered token
        self._buf_len = 0
        self._cursor_row = cursor_row               # first row whose tokens are still needed
        self._fill_to(cursor_row * T + 1)
        self._drop_before(cursor_row * T)

    # ----------------------------------------------------------------------------------------------
    # state

    def _check_state(self, state: dict) -> tuple[int, int, int, int]:
        """Validate a state_dict() from an earlier run; returns (doc_index, token_offset, cursor_row, rows_done)."""
        try:
            version, T, split, kind = state["version"], state["T"], state["split"], state["source"]
            doc_index, token_offset = int(state["doc_index"]), int(state["token_offset"])
            cursor_row, rows_done = int(state["cursor_row"]), int(state["rows_done"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"loader state is malformed ({e!r}); resume from a checkpoint written by this version") from e
        if version != STATE_VERSION:
            raise ValueError(f"loader state version {version} != {STATE_VERSION}; start a fresh run")
        if kind != self.source.kind:
            raise ValueError(f"loader state was saved reading source {kind!r}, this loader reads "
                             f"{self.source.kind!r}: resume with the same --source")
        if T != self.T or split != self.split:
            raise ValueError(f"loader state was saved with T={T}, split={split!r}; this loader has T={self.T}, "
                             f"split={self.split!r}: resume with the same --max_seq_len")
        per_chunk = self.world_size * self.B
        if rows_done % per_chunk:
            raise ValueError(f"resumed loader has consumed {rows_done} rows, not a multiple of world_size*B = "
                             f"{per_chunk}; resume with a batch split that divides it")
        if cursor_row > rows_done + self.rank * self.B:
            raise ValueError("loader state cursor lies past the rows this rank still needs; use the state "
                             "saved by the same run")
        return doc_index, token_offset, cursor_row, rows_done

    def state_dict(self) -> dict:
        """JSON-serializable position: resuming from it continues exactly where this loader is."""
        pos = self._cursor_row * self.T
        start, doc = self._doc_at(pos)
        return {"version": STATE_VERSION, "source": self.source.kind, "T": self.T, "split": self.split,
                "doc_index": doc,
                "token_offset": pos - start, "cursor_row": self._cursor_row,
                "rows_done": self.chunk * self.world_size * self.B}

    # ----------------------------------------------------------------------------------------------
    # stream buffer

    def _doc_at(self, pos: int) -> tuple[int, int]:
        """(start position, index) of the buffered document that contains stream position pos."""
        found = None
        for start, doc in self._bounds:
            if start > pos:
                break
            found = (start, doc)
        if found is None:
            raise RuntimeError(f"internal: no buffered document covers stream position {pos}")
        return found

    def _fill_to(self, end: int):
        """Tokenize documents until the buffer reaches stream position `end` (exclusive)."""
        while self._buf_start + self._buf_len < end:
            docs = [next(self._docs) for _ in range(DOCS_PER_ENCODE)]
            for (text, answers), ids in zip(docs, self.tokenizer.encode([t for t, _ in docs], prepend=self.bos)):
                if not ids or ids[0] != self.bos:
                    raise RuntimeError("tokenizer.encode(..., prepend=bos) did not put BOS first")
                ids = np.asarray(ids, dtype=np.int64)
                self._bounds.append((self._buf_start + self._buf_len, self._next_doc))
                self._pieces.append(np.stack([ids, self._target_flags(ids, text, answers, self._next_doc)]))
                self._next_doc += 1
                self._buf_len += len(ids)

    def _target_flags(self, ids: np.ndarray, text: str, answers: list, doc_index: int) -> np.ndarray:
        """int64 [n]: 1 where token j counts as a loss target (module docstring, "Loss targets")."""
        keep = self.source.target_keep
        if keep >= 1:
            return np.ones_like(ids)
        flags = (np.random.default_rng([doc_index, 7]).random(len(ids)) < keep).astype(np.int64)
        if not text.isascii():  # answers are char offsets; tokens are measured in bytes
            raise ValueError("answer-weighted loss needs ASCII documents (the synthetic corpus is)")
        starts = np.concatenate([[0], np.cumsum(self._token_bytes[ids])[:-1]])  # byte start per token
        for a, b in answers:  # tokens overlapping [a, b): the last starting at or before a .. the first at b
            first = np.searchsorted(starts, a, side="right") - 1
            flags[first:np.searchsorted(starts, b, side="left")] = 1
        return flags

    def _drop_before(self, pos: int):
        """Forget buffered tokens before stream position pos (keeps the doc bound covering pos)."""
        while self._pieces and self._buf_start + self._pieces[0].shape[1] <= pos:
            self._buf_start += self._pieces[0].shape[1]
            self._buf_len -= self._pieces.popleft().shape[1]
        if self._pieces and self._buf_start < pos:
            cut = pos - self._buf_start
            self._pieces[0] = self._pieces[0][:, cut:]
            self._buf_start, self._buf_len = pos, self._buf_len - cut
        while len(self._bounds) > 1 and self._bounds[1][0] <= pos:
            self._bounds.popleft()

    def _take(self, start: int, n: int) -> np.ndarray:
        """[2, n]: tokens S[start : start+n] and their target flags (start must be >= buffer start)."""
        self._fill_to(start + n)
        self._drop_before(start)
        out, need = [], n
        for piece in self._pieces:
            out.append(piece[:, :need])
            need -= out[-1].shape[1]
            if need == 0:
                break
        return np.concatenate(out, axis=1)

    # ----------------------------------------------------------------------------------------------
    # batches

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next B rows this rank owns as (x, y), each [B, T] long on the loader's device."""
        B, T = self.B, self.T
        first_row = self.chunk * self.world_size * B + self.rank * B
        # B consecutive rows = S[first_row*T : (first_row+B)*T + 1]: B*T+1 tokens, then
        # x = tokens[:-1].view(B, T) and y = tokens[1:].view(B, T) (row b's y is x shifted by one).
        tokens, flags = torch.from_numpy(self._take(first_row * T, B * T + 1))
        y = tokens[1:] if self.source.target_keep >= 1 else torch.where(flags[1:] == 1, tokens[1:], -1)
        self.chunk += 1
        self._cursor_row = first_row + B  # rows before it are done; this rank's next row is further on
        self._drop_before(self._cursor_row * T)
        xy = torch.stack([tokens[:-1], y])  # one host-to-device copy for both
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        else:
            xy = xy.to(self.device)
        return xy[0].view(B, T), xy[1].view(B, T)

    def __iter__(self):
        while True:
            yield self.next_batch()
