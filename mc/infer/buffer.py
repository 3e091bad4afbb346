"""
AppendBuffer: a 1-D CPU tensor with spare capacity, for the inference session's per-token vectors
(token ids, plan, entry list: mc/infer/session.py). Appending k values costs O(k) amortised: a decode step
appends one value to each, and an O(T) torch.cat per token would make decoding slower as the history grows.
"""

import torch


class AppendBuffer:
    """A 1-D CPU tensor with spare capacity: appending k values costs O(k) amortised (no O(T) cat per token)."""

    def __init__(self, dtype):
        self.data, self.n = torch.empty(64, dtype=dtype), 0

    def view(self) -> torch.Tensor:
        return self.data[: self.n]

    def extend(self, values: torch.Tensor):
        k = values.numel()
        if self.n + k > self.data.numel():
            grown = torch.empty(max(2 * (self.n + k), 64), dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n: self.n + k] = values
        self.n += k

    def append(self, value):
        """One scalar (the per-token decode path: no temporary tensors)."""
        if self.n == self.data.numel():
            grown = torch.empty(2 * self.n, dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n] = value
        self.n += 1

    def set(self, values: torch.Tensor):
        self.n = 0
        self.extend(values)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
