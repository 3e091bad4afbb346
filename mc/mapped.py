"""
Growable tensors in memory-mapped files: the storage of the MegaContext tree on disk (--mc_tree disk).

    rows = MappedRows(folder, torch.float32, (C,))
    data = rows.reserve(n)          # [capacity >= n, C]; what was written before is still there
    rows.release()                  # drop the pages from this process's resident memory (they stay in the file)

GrowableRows is what its users hold: the same rows in RAM (doubling, copied) or, given a folder, in a
MappedRows file; the session's per-token buffers (mc/infer/buffer.py) and the keymatch keys (mc/keymatch.py).

The file is created under `folder` and unlinked at once: the mapping keeps its blocks alive for as long as a
tensor views them, and the kernel frees them when the last view goes, after a kill -9 too, so no stale file is
ever left behind (and nothing else can open it). Growing extends the file (ftruncate) and maps it again; the
rows written so far stay where they are in the file, so nothing is copied, and an old mapping lives on while a
tensor still views it (torch.frombuffer holds it).

Resident memory. Written pages are the kernel's page cache, shared with the file: they count in the
process's RSS (as RssFile, not RssAnon) while they are mapped and resident. release() unmaps them from the
process (madvise MADV_DONTNEED on a shared file mapping: the data stays in the file and the page cache, which
the kernel may drop when memory is wanted), so a session that releases after each refocus keeps resident only
the pages it has read since: the gists of its working context, not the history.
"""

import math
import mmap
import os
import tempfile
import weakref

import torch


class MappedRows:
    def __init__(self, folder: str, dtype: torch.dtype, row_shape: tuple = ()):
        os.makedirs(folder, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=folder, prefix="mc_tree_", suffix=".bin")
        os.unlink(path)  # the mapping keeps the blocks; the name is not needed (module docstring)
        self._fd = fd
        weakref.finalize(self, os.close, fd)
        self.dtype, self.row_shape = dtype, tuple(row_shape)
        self.row_bytes = torch.empty(0, dtype=dtype).element_size() * math.prod(self.row_shape)
        self.capacity, self.data, self._map = 0, None, None

    def reserve(self, rows: int) -> torch.Tensor:
        """[capacity, *row_shape] with capacity >= rows (doubling: amortised O(1) per row, no copy)."""
        if rows > self.capacity:
            capacity = max(2 * rows, 64)
            os.ftruncate(self._fd, capacity * self.row_bytes)
            self._map = mmap.mmap(self._fd, capacity * self.row_bytes)
            self.data = torch.frombuffer(self._map, dtype=self.dtype).view(capacity, *self.row_shape)
            self.capacity = capacity
        return self.data

    def release(self):
        """Unmap the resident pages of the current mapping from this process (the data stays in the file)."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    def nbytes(self) -> int:
        return self.capacity * self.row_bytes


class GrowableRows:
    """Rows [capacity, *row_shape] with spare capacity (doubling: amortised O(1) per row), in RAM or, with a
    folder, in a MappedRows file there (--mc_tree disk)."""

    def __init__(self, dtype: torch.dtype, row_shape: tuple = (), folder: str | None = None, min_rows: int = 64):
        self.mapped = MappedRows(folder, dtype, row_shape) if folder is not None else None
        self.min_rows = min_rows
        self.data = self.mapped.reserve(min_rows) if self.mapped is not None else \
            torch.empty(min_rows, *row_shape, dtype=dtype)

    def reserve(self, need: int, keep: int) -> torch.Tensor:
        """data with room for `need` rows, its first `keep` rows kept (a mapped file grows in place)."""
        if need > self.data.size(0):
            if self.mapped is not None:
                self.data = self.mapped.reserve(need)
            else:
                grown = torch.empty(max(2 * need, self.min_rows), *self.data.shape[1:], dtype=self.data.dtype)
                grown[:keep] = self.data[:keep]
                self.data = grown
        return self.data

    def shrink(self, rows: int):
        """In RAM, drop the contents and give the memory back when `rows` need a quarter of the capacity or less."""
        if self.mapped is None and 4 * max(rows, 16) < self.data.size(0):
            self.data = torch.empty(max(2 * rows, self.min_rows), *self.data.shape[1:], dtype=self.data.dtype)

    def nbytes(self) -> int:
        """Bytes in RAM (0 when the rows live in a mapped file: mapped_bytes)."""
        return 0 if self.mapped is not None else self.data.numel() * self.data.element_size()

    def mapped_bytes(self) -> int:
        return 0 if self.mapped is None else self.mapped.nbytes()

    def release(self):
        if self.mapped is not None:
            self.mapped.release()
