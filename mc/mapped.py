"""
Growable tensors in memory-mapped files: the storage of the MegaContext tree on disk (--mc_tree disk).

    rows = MappedRows(folder, torch.float32, (C,))
    data = rows.reserve(n)          # [capacity >= n, C]; what was written before is still there
    rows.release()                  # drop the pages from this process's resident memory (they stay in the file)

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
        self.row_bytes = torch.empty(0, dtype=dtype).element_size() * max(1, _prod(self.row_shape))
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


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out
