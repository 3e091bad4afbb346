"""
MegaContextTree: the whole history at every level of detail, as batched tensors.

    LOD0  [B, T, C]    token embeddings (kept only when cache_lod0=True)
    LOD1  [B, n1, C]   n1 = floor(T / bs): one gist per complete block of bs tokens
    LOD2  [B, n2, C]   n2 = floor(n1 / bs): one gist per bs LOD1 gists (bs**2 = 1024 tokens)
    ...                up to max_lod; entry j of level l covers tokens [j * bs**l, (j+1) * bs**l)

A partial last block (T not a multiple of bs) has no gist until it completes: its token embeddings
wait in `tail` (always kept, at most bs - 1 rows), and its tokens stay raw in any working context.

Building is batched: every complete block of every sample goes through GistNet in ONE call per level
([B * n_new, bs, C] -> [B * n_new, C]), with gradients (training builds the tree from wte(x) each
step). `build(lod0)` is `append(lod0)` on an empty tree.

append(embeddings [B, t, C]) grows the histories (inference, usually B = 1): new tokens join the tail,
each block that completes is gisted once, each group of bs new LOD1 gists makes a LOD2 gist, and so
on. Old gists are never recomputed. Without autograd, levels live in buffers whose capacity doubles
(amortised O(new rows) per append); with autograd they are concatenated so gradients flow.

disk_dir (--mc_tree disk, inference: one history, no autograd): the levels live in memory-mapped files
under that folder (mc/mapped.py) instead of RAM; release() drops their pages from resident memory.

cache_lod0=False (seed 004 C): LOD0 is not stored (only the < bs tail rows needed to finish the next
block). Raw tokens of a working context then come from re-embedding their ids with wte, which is
cheaper than keeping C floats per token: pass them as levels[0] to build_working_context.

The geometry of a covering with the last R tokens raw (training's variants, the session's budget check):
the compressible prefix [0, P), P = floor((T - R) / bs) * bs, holds n_l = floor(n_1 / bs**(l-1))
complete level-l units (unit_counts), and the most compressed covering has
    E_min = n_L + sum_{l<L} (n_l - bs * n_{l+1}) + (T - P)
entries (min_variant_entries): every token inside the coarsest unit that contains it, the tail raw.
"""

import torch

from mc.mapped import MappedRows


def unit_counts(T: int, block_size: int, max_lod: int, recent_tokens: int) -> list[int]:
    """[n_1, ..., n_max_lod]: complete aligned level-l units inside the compressible prefix."""
    n1 = max(T - recent_tokens, 0) // block_size
    return [n1 // block_size ** (level - 1) for level in range(1, max_lod + 1)]


def min_variant_entries(T: int, block_size: int, max_lod: int, recent_tokens: int) -> int:
    """Entries of the most compressed variant covering [0, T) with at least the last R tokens raw."""
    n = unit_counts(T, block_size, max_lod, recent_tokens)
    entries = T - n[0] * block_size  # the raw tail
    for level in range(max_lod):
        above = n[level + 1] * block_size if level + 1 < max_lod else 0
        entries += n[level] - above  # level-(level+1) units not inside a coarser unit
    return entries


class MegaContextTree:
    def __init__(self, gistnet, block_size: int = 32, max_lod: int = 2, cache_lod0: bool = True,
                 disk_dir: str | None = None):
        if block_size < 2:
            raise ValueError(f"--mc_block_size={block_size} must be >= 2")
        if max_lod < 1:
            raise ValueError(f"--mc_max_lod={max_lod} must be >= 1")
        self.gistnet = gistnet
        self.block_size = block_size
        self.max_lod = max_lod
        self.cache_lod0 = cache_lod0
        self.num_tokens = 0  # history length T (tokens appended so far)
        self.batch_size = None
        self._buf = [None] * (max_lod + 1)  # level tensors, possibly with spare capacity
        self._len = [0] * (max_lod + 1)  # rows in use per level
        self.tail = None  # [B, num_tokens % bs, C] LOD0 of the incomplete last block
        self.disk_dir = disk_dir
        self._mapped = [None] * (max_lod + 1)  # disk_dir: each level's MappedRows

    @classmethod
    def build(cls, lod0: torch.Tensor, gistnet, block_size: int = 32, max_lod: int = 2,
              cache_lod0: bool = True) -> "MegaContextTree":
        """Tree over a batch of histories lod0 [B, T, C] (T need not be a multiple of block_size)."""
        tree = cls(gistnet, block_size, max_lod, cache_lod0)
        tree.append(lod0)
        return tree

    # ------------------------------------------------------------------ reading
    def level(self, level: int) -> torch.Tensor:
        """[B, n_level, C]. LOD0 raises if it is not cached."""
        if not 0 <= level <= self.max_lod:
            raise ValueError(f"level must be in [0, {self.max_lod}], got {level}")
        if level == 0 and not self.cache_lod0:
            raise ValueError("LOD0 is not cached (--mc_cache_lod0=0); re-embed the token ids with wte instead")
        buf = self._buf[level]
        if buf is None:
            if self.tail is None:
                raise ValueError("the tree is empty; build() or append() first")
            return self.tail[:, :0]  # no complete unit at this level yet: [B, 0, C]
        return buf[:, : self._len[level]]

    @property
    def levels(self) -> list:
        """[LOD0 or None (not cached), LOD1, ..., LOD max_lod] — the `levels` of build_working_context."""
        return [self.level(level) if (level > 0 or self.cache_lod0) else None for level in range(self.max_lod + 1)]

    def num_entries(self, level: int) -> int:
        return self.num_tokens if level == 0 else self._len[level]

    def span_starts(self, level: int, device=None) -> torch.Tensor:
        """long [n_level]: first token of each entry of this level (j * bs**level)."""
        return torch.arange(self.num_entries(level), device=device) * self.block_size ** level

    # ------------------------------------------------------------------ writing
    def append(self, embeddings: torch.Tensor) -> list[int]:
        """Add tokens [B, t, C] to every history. Returns the number of new entries per level."""
        if embeddings.ndim != 3:
            raise ValueError(f"append expects [B, t, C] embeddings, got shape {tuple(embeddings.shape)}")
        B, t, C = embeddings.shape
        if self.batch_size is None:
            self.batch_size = B
            self.tail = embeddings[:, :0]
        elif B != self.batch_size:
            raise ValueError(f"this tree holds {self.batch_size} histories; got embeddings for {B}")
        if self.disk_dir is not None and B != 1:
            raise ValueError(f"a tree on disk (--mc_tree disk) holds one history (an inference session); got {B}")
        new = [0] * (self.max_lod + 1)
        if t == 0:
            return new
        bs = self.block_size
        if self.cache_lod0:
            self._push(0, embeddings)
        new[0] = t
        self.num_tokens += t
        # LOD1: the tail plus the new tokens, cut into complete blocks
        pending = torch.cat([self.tail, embeddings.to(self.tail.dtype)], 1) if self.tail.size(1) else embeddings
        n = pending.size(1) // bs
        self.tail = pending[:, n * bs:].clone()  # clone: do not keep the caller's whole tensor alive
        if n:
            blocks = pending[:, : n * bs].reshape(B * n, bs, C)
            self._push(1, self.gistnet(blocks).view(B, n, C))
            new[1] = n
        # LOD l >= 2: groups of bs complete level-(l-1) gists not yet summarised
        for level in range(2, self.max_lod + 1):
            done, below = self._len[level], self._len[level - 1]
            n = below // bs - done
            if n <= 0:
                break
            group = self._buf[level - 1][:, done * bs: (done + n) * bs].reshape(B * n, bs, C)
            self._push(level, self.gistnet(group).view(B, n, C))
            new[level] = n
        return new

    def grow(self) -> int:
        """Add a level above max_lod: the same GistNet over groups of bs gists of the level below (one gist
        per bs**(max_lod + 1) tokens). Returns the gists made now; later appends extend the level as any
        other. The inference session grows its tree when a history outgrows the checkpoint's max_lod."""
        self.max_lod += 1
        self._buf.append(None)
        self._len.append(0)
        self._mapped.append(None)
        if self.batch_size is None:
            return 0
        level, bs = self.max_lod, self.block_size
        n = self._len[level - 1] // bs
        if n:
            B, C = self.batch_size, self._buf[level - 1].size(2)
            group = self._buf[level - 1][:, : n * bs].reshape(B * n, bs, C)
            self._push(level, self.gistnet(group).view(B, n, C))
        return n

    def _push(self, level: int, rows: torch.Tensor):
        """Append rows [B, k, C] to a level: concatenate under autograd, else write into spare capacity."""
        buf, n, k = self._buf[level], self._len[level], rows.size(1)
        if buf is None and self.disk_dir is None:
            self._buf[level], self._len[level] = rows, k
            return
        if torch.is_grad_enabled() and (rows.requires_grad or (buf is not None and buf.requires_grad)):
            if self.disk_dir is not None:
                raise ValueError("a tree on disk (--mc_tree disk) is for inference: its gists carry no gradients")
            self._buf[level] = torch.cat([buf[:, :n], rows], 1)
        else:
            if buf is None or n + k > buf.size(1):  # grow to twice the need: amortised O(1) copies per row
                buf = self._grown(level, buf, n + k, rows)
            buf[:, n: n + k] = rows.to(buf.dtype)
            self._buf[level] = buf
        self._len[level] = n + k

    def _grown(self, level: int, buf: torch.Tensor | None, need: int, like: torch.Tensor) -> torch.Tensor:
        """The level's buffer with room for `need` rows, the rows so far kept (on disk they stay in place)."""
        if self.disk_dir is not None:
            if self._mapped[level] is None:
                self._mapped[level] = MappedRows(self.disk_dir, like.dtype, like.shape[2:])
            return self._mapped[level].reserve(need)[None]
        grown = buf.new_empty(buf.size(0), max(2 * need, 16), buf.size(2))
        grown[:, : self._len[level]] = buf[:, : self._len[level]]
        return grown

    def release(self):
        """Drop the pages of a tree on disk from resident memory (mc/mapped.py); nothing for a RAM tree."""
        for mapped in self._mapped:
            if mapped is not None:
                mapped.release()

    def nbytes(self) -> int:
        """Bytes of the levels in RAM (spare capacity included) and of the tail; mapped levels not counted."""
        ram = sum(b.numel() * b.element_size() for b, m in zip(self._buf, self._mapped) if b is not None and m is None)
        return ram + (0 if self.tail is None else self.tail.numel() * self.tail.element_size())

    def mapped_bytes(self) -> int:
        """Bytes of the levels held in memory-mapped files (0 for a RAM tree)."""
        return sum(m.nbytes() for m in self._mapped if m is not None)
