"""
KV cache for incremental decoding with nanochat.gpt.GPT.

Holds the rotated keys and the values of every layer for a batch of sequences:
    k, v: [num_layers, B, H_kv, capacity, head_dim]
and a single write position `pos` shared by all layers (every layer sees the same tokens).

- insert_kv(layer, k, v): writes [B, H_kv, T, D] at pos..pos+T and returns all keys/values so far
  ([B, H_kv, pos+T, D]); the last layer's call advances pos by T.
- The buffers GROW (reallocate at least 2x and copy) when a write would pass the allocation, so a
  caller never has to know the final length up front.
- set_pos(p) truncates (keeps the first p positions: re-prefill from a changed position onward),
  reset() empties the cache, prefill(other) copies another cache (e.g. a batch-1 prompt prefill
  broadcast to B samples).
- insert_inputs(x): keeps every position's block input too (for the GPT's previous-token mix, which
  needs the input at pos - 1 when a decode step or a re-prefill after set_pos starts at pos).
- dtype=None allocates lazily on the first insert, in the dtype of the keys (bf16 under autocast).
"""

import torch


class KVCache:
    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device=None, dtype=None):
        if min(batch_size, num_heads, seq_len, head_dim, num_layers) < 1:
            raise ValueError(
                f"KVCache sizes must all be >= 1, got batch_size={batch_size} num_heads={num_heads} "
                f"seq_len={seq_len} head_dim={head_dim} num_layers={num_layers}"
            )
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self._initial_len = seq_len
        self.k = None  # [L, B, H, capacity, D], allocated now or on the first insert
        self.v = None
        self.inputs = None  # [B, capacity, n_embd], only for models with the previous-token mix
        self.pos = 0
        if dtype is not None:
            self._allocate(seq_len, dtype)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def capacity(self) -> int:
        """Positions the current allocation can hold without growing."""
        return self.k.size(3) if self.k is not None else self._initial_len

    def get_pos(self) -> int:
        """Number of positions already written (the absolute position of the next token)."""
        return self.pos

    def reset(self):
        """Forget everything (keeps the allocation)."""
        self.pos = 0

    def set_pos(self, pos: int):
        """Truncate to the first `pos` positions, e.g. to re-prefill from a changed position."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"set_pos({pos}) is outside the cached range 0..{self.pos}")
        self.pos = pos

    def _allocate(self, length, dtype):
        shape = (self.num_layers, self.batch_size, self.num_heads, length, self.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=dtype)
        self.dtype = dtype

    def _grow(self, needed):
        """Reallocate to max(needed, 2 * capacity) rounded up to a multiple of 64; copy what is cached."""
        new_len = max(needed, 2 * self.capacity)
        new_len = (new_len + 63) // 64 * 64
        old_k, old_v = self.k, self.v
        self._allocate(new_len, self.dtype)
        self.k[:, :, :, : self.pos] = old_k[:, :, :, : self.pos]
        self.v[:, :, :, : self.pos] = old_v[:, :, :, : self.pos]

    def insert_inputs(self, x, k=1):
        """Write block inputs x [B, T, D] at pos..pos+T; return the k inputs before pos, [B, k, D] (positions
        pos-k..pos-1; zeros before position 0). Does not advance pos (insert_kv does, after the last layer)."""
        B, T, D = x.shape
        t0, t1 = self.pos, self.pos + T
        if self.inputs is None or self.inputs.size(1) < t1 or self.inputs.size(2) != D:
            grown = torch.zeros(B, (max(t1, 2 * self.capacity) + 63) // 64 * 64, D, device=x.device, dtype=x.dtype)
            if self.inputs is not None:
                grown[:, :t0] = self.inputs[:, :t0]
            self.inputs = grown
        before = x.new_zeros(B, k, D)
        n = min(k, t0)
        if n:
            before[:, k - n:] = self.inputs[:, t0 - n:t0]
        self.inputs[:, t0:t1] = x
        return before

    # ------------------------------------------------------------------ the hot path
    def insert_kv(self, layer_idx, k, v):
        """Write k, v ([B, H_kv, T, D]) for one layer at pos..pos+T; return keys/values [B, H_kv, pos+T, D]."""
        B, H, T, D = k.shape
        if (B, H, D) != (self.batch_size, self.num_heads, self.head_dim):
            raise ValueError(
                f"KVCache was built for batch={self.batch_size} kv_heads={self.num_heads} head_dim={self.head_dim} "
                f"but got keys of shape {tuple(k.shape)}; build the cache with the model's n_kv_head and batch size"
            )
        if self.k is None:
            self._allocate(max(self._initial_len, T), k.dtype)
        t0, t1 = self.pos, self.pos + T
        if t1 > self.capacity:
            self._grow(t1)
        self.k[layer_idx, :, :, t0:t1] = k
        self.v[layer_idx, :, :, t0:t1] = v
        keys, values = self.k[layer_idx, :, :, :t1], self.v[layer_idx, :, :, :t1]
        if layer_idx == self.num_layers - 1:
            self.pos = t1  # every layer has now written these T positions
        return keys, values

    def prefill(self, other: "KVCache"):
        """Copy another cache's contents into this one; a batch-1 source is broadcast to every row."""
        if (other.num_layers, other.num_heads, other.head_dim) != (self.num_layers, self.num_heads, self.head_dim):
            raise ValueError("prefill: source cache has a different number of layers, kv heads or head_dim")
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"prefill: source batch {other.batch_size} must be 1 or {self.batch_size}")
        if other.k is None:
            self.pos = 0
            return
        if self.k is None:
            self._allocate(max(self._initial_len, other.pos), other.dtype)
        elif other.pos > self.capacity:
            self.pos = 0
            self._grow(other.pos)
        n = other.pos
        self.k[:, :, :, :n] = other.k[:, :, :, :n].to(self.dtype)
        self.v[:, :, :, :n] = other.v[:, :, :, :n].to(self.dtype)
        if other.inputs is not None:
            self.inputs = other.inputs[:, :max(n, 1)].expand(self.batch_size, -1, -1).clone()
        self.pos = n
