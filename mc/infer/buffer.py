"""
AppendBuffer: a 1-D CPU tensor with spare capacity, for the inference session's per-token vectors
(token ids, plan, entry list: mc/infer/session.py). Appending k values costs O(k) amortised: a decode step
appends one value to each, and an O(T) torch.cat per token would make decoding slower as the history grows.
With a folder (--mc_tree disk) the values live in a memory-mapped file there (mc/mapped.py).
"""

import torch

from mc.mapped import MappedRows


class AppendBuffer:
    """A 1-D CPU tensor with spare capacity: appending k values costs O(k) amortised (no O(T) cat per token)."""

    def __init__(self, dtype, folder: str | None = None):
        self.mapped = MappedRows(folder, dtype) if folder is not None else None
        self.n = 0
        self.data = self.mapped.reserve(64) if self.mapped is not None else torch.empty(64, dtype=dtype)

    def view(self) -> torch.Tensor:
        return self.data[: self.n]

    def _reserve(self, need: int):
        if need <= self.data.numel():
            return
        if self.mapped is not None:  # the file grows in place: the values so far are already there
            self.data = self.mapped.reserve(need)
            return
        grown = torch.empty(max(2 * need, 64), dtype=self.data.dtype)
        grown[: self.n] = self.data[: self.n]
        self.data = grown

    def extend(self, values: torch.Tensor):
        k = values.numel()
        self._reserve(self.n + k)
        self.data[self.n: self.n + k] = values
        self.n += k

    def append(self, value):
        """One scalar (the per-token decode path: no temporary tensors)."""
        self._reserve(self.n + 1)
        self.data[self.n] = value
        self.n += 1

    def set(self, values: torch.Tensor):
        """Replace the contents. In RAM, a buffer left 4x too large gives the memory back: the entry list
        holds every token of a long ingest until the hard fit, then at most W entries."""
        k = values.numel()
        if self.mapped is None and 4 * max(k, 16) < self.data.numel():
            self.data = torch.empty(max(2 * k, 64), dtype=self.data.dtype)
        self.n = 0
        self.extend(values)

    def nbytes(self) -> int:
        """Bytes in RAM (0 when the values live in a mapped file: mapped_bytes)."""
        return 0 if self.mapped is not None else self.data.numel() * self.data.element_size()

    def mapped_bytes(self) -> int:
        return 0 if self.mapped is None else self.mapped.nbytes()

    def release(self):
        if self.mapped is not None:
            self.mapped.release()
