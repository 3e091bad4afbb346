"""
AppendBuffer: a 1-D CPU tensor with spare capacity, for the inference session's per-token vectors
(token ids, plan, entry list: mc/infer/session.py). Appending k values costs O(k) amortised: a decode step
appends one value to each, and an O(T) torch.cat per token would make decoding slower as the history grows.
With a folder (--mc_tree disk) the values live in a memory-mapped file there (mc.mapped.GrowableRows).
"""

import torch

from mc.mapped import GrowableRows


class AppendBuffer:
    """A 1-D CPU tensor with spare capacity: appending k values costs O(k) amortised (no O(T) cat per token)."""

    def __init__(self, dtype, folder: str | None = None):
        self.rows = GrowableRows(dtype, (), folder)
        self.n = 0

    def view(self) -> torch.Tensor:
        return self.rows.data[: self.n]

    def extend(self, values: torch.Tensor):
        k = values.numel()
        self.rows.reserve(self.n + k, self.n)[self.n: self.n + k] = values
        self.n += k

    def append(self, value):
        """One scalar (the per-token decode path: no temporary tensors)."""
        self.rows.reserve(self.n + 1, self.n)[self.n] = value
        self.n += 1

    def set(self, values: torch.Tensor):
        """Replace the contents. In RAM, a buffer left 4x too large gives the memory back: the entry list
        holds every token of a long ingest until the hard fit, then at most W entries."""
        self.rows.shrink(values.numel())
        self.n = 0
        self.extend(values)

    def nbytes(self) -> int:
        """Bytes in RAM (0 when the values live in a mapped file: mapped_bytes)."""
        return self.rows.nbytes()

    def mapped_bytes(self) -> int:
        return self.rows.mapped_bytes()

    def release(self):
        self.rows.release()
