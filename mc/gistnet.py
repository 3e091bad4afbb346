"""
GistNet: compress a block of embeddings into one gist embedding. [N, S, C] (+ mask [N, S]) -> [N, C].

The same network makes LOD1 gists (over block_size token embeddings) and LOD2 gists (over
block_size LOD1 gists); see mc/tree.py.

gistnet_type:
- "mean":        the masked mean of the block, no parameters (the MEANPOOL baseline).
- "transformer": `layers` pre-norm blocks of its own, then pooling, then a head:
    block:   x = x + Attn(norm(x)),  x = x + MLP(norm(x))
             Attn is bidirectional inside the block (every token sees every real token), rotary over
             the in-block index, QK-norm, F.scaled_dot_product_attention with the key-padding mask, so
             padded tokens are never attended to; MLP = relu(x W1)^2 W2 (4x hidden); norm = RMSNorm
             without parameters; no biases.
    pooling: "mean"  masked mean over the block's real tokens;
             "query" a learned query per head attends over the block (masked softmax of
                     q . k / sqrt(d), k = norm(norm(x) Wk)) and takes the weighted mean of x itself;
             "cls"   a CLS slot is prepended to the block before the transformer blocks; its input is the
                     block's masked mean plus a learned vector, its output is the gist.
    head:    "mlp"    h + W2 relu(W1 norm(h))^2;  "linear" W h.

Initialisation: input projections U(-a, a) with a = sqrt(3 / fan_in) (unit-variance outputs for
unit-RMS inputs); every output projection (attention, MLP, MLP head) zero, the linear head the
identity, the pooling query and the CLS vector zero. Then each block is the identity, query pooling is
uniform, the CLS input is the mean, and the head is the identity: a fresh GistNet outputs exactly the
masked mean of its inputs, so gists carry usable content from step 0 and training starts from the
MEANPOOL baseline. (Gradients still reach the zero-initialised output projections, and through them
everything else from the second step on.)

Rows with no real token at all give a zero gist. Padded positions cannot influence the output.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mc.blocks import BidirectionalBlock
from mc.positions import rope_inv_freq
from nanochat.gpt import norm


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[N, S, C], bool [N, S] (True = real) -> [N, C]: sum over real rows / their count (0 if none)."""
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


class GistNet(nn.Module):
    def __init__(self, n_embd: int, block_size: int = 32, gistnet_type: str = "transformer", layers: int = 2,
                 pooling: str = "mean", head: str = "mlp", n_head: int = 4):
        super().__init__()
        if gistnet_type not in ("transformer", "mean"):
            raise ValueError(f"--gistnet_type={gistnet_type!r} is not one of transformer, mean")
        if pooling not in ("mean", "query", "cls"):
            raise ValueError(f"--gistnet_pooling={pooling!r} is not one of mean, query, cls")
        if head not in ("mlp", "linear"):
            raise ValueError(f"--gistnet_head={head!r} is not one of mlp, linear")
        self.n_embd, self.block_size, self.gistnet_type = n_embd, block_size, gistnet_type
        self.pooling, self.head, self.n_head = pooling, head, n_head
        if gistnet_type == "mean":
            return
        if layers < 1:
            raise ValueError(f"--gistnet_layers={layers} must be >= 1 for a transformer GistNet")
        if n_embd % n_head or (n_embd // n_head) % 2:
            raise ValueError(f"GistNet needs n_embd={n_embd} divisible by n_head={n_head} into an even head_dim")
        self.blocks = nn.ModuleList([BidirectionalBlock(n_embd, n_head) for _ in range(layers)])
        hd = n_embd // n_head
        if pooling == "query":
            self.pool_k = nn.Linear(n_embd, n_embd, bias=False)
            self.pool_query = nn.Parameter(torch.zeros(n_head, hd))
        if pooling == "cls":
            self.cls = nn.Parameter(torch.zeros(n_embd))
        if head == "mlp":
            self.head_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
            self.head_proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        else:
            self.head_lin = nn.Linear(n_embd, n_embd, bias=False)
        # in-block rotary table (block_size + 1 slots: room for the CLS slot); rebuilt on demand
        self._rope_cache = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Deterministic given the torch seed; see the module docstring for why it starts as a mean."""
        if self.gistnet_type == "mean":
            return
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "c_mlp.weight", "head_proj.weight")) or name in ("pool_query", "cls"):
                nn.init.zeros_(p)
            elif name == "head_lin.weight":
                p.copy_(torch.eye(self.n_embd))
            else:
                bound = math.sqrt(3.0 / p.size(1))
                nn.init.uniform_(p, -bound, bound)

    def matrix_params(self) -> list:
        """2D weight matrices (for Muon)."""
        return [p for n, p in self.named_parameters() if p.ndim == 2 and n != "pool_query"]

    def vector_params(self) -> list:
        """Everything else: the pooling query and the CLS vector (for AdamW)."""
        return [p for n, p in self.named_parameters() if p.ndim != 2 or n == "pool_query"]

    def _rope(self, S, device):
        c = self._rope_cache
        if c is None or c[0].size(0) < S or c[0].device != device:
            inv_freq = rope_inv_freq(self.n_embd // self.n_head, device=device)
            ang = torch.arange(max(S, self.block_size + 1), dtype=torch.float32, device=device)[:, None] * inv_freq
            c = self._rope_cache = (ang.cos()[:, None, :], ang.sin()[:, None, :])
        return c[0][:S], c[1][:S]

    def forward(self, blocks: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if blocks.ndim != 3 or blocks.size(-1) != self.n_embd:
            raise ValueError(f"GistNet expects blocks [N, S, {self.n_embd}], got {tuple(blocks.shape)}")
        N, S, C = blocks.shape
        if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (N, S)):
            raise ValueError(f"key_padding_mask must be bool [N, S] = [{N}, {S}] (True = real), "
                             f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        mask = key_padding_mask
        if self.gistnet_type == "mean":
            return masked_mean(blocks, mask)
        x = blocks
        nonempty = mask.any(1) if mask is not None else None
        if self.pooling == "cls":
            cls = (masked_mean(x, mask) + self.cls.to(x.dtype))[:, None, :]
            x = torch.cat([cls, x], dim=1)
            if mask is not None:
                mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        attn_mask = None
        if mask is not None:
            # keys: real tokens only; a row with no real token attends to everything (its output is zeroed)
            attn_mask = (mask | ~nonempty[:, None])[:, None, None, :]
        cos, sin = self._rope(x.size(1), x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.blocks:
            x = block(x, attn_mask, cos, sin)
        if self.pooling == "cls":
            h = x[:, 0]
        elif self.pooling == "query":
            H = self.n_head
            k = norm(self.pool_k(norm(x)).view(N, S, H, C // H))
            scores = (k * self.pool_query.to(x.dtype)).sum(-1) / math.sqrt(C // H)  # [N, S, H]
            if mask is not None:
                scores = scores.masked_fill(~(mask | ~nonempty[:, None])[..., None], float("-inf"))
            w = scores.softmax(dim=1)
            h = (w[..., None] * x.view(N, S, H, C // H)).sum(1).reshape(N, C)
        else:
            h = masked_mean(x, mask)
        if self.head == "mlp":
            h = h + self.head_proj(F.relu(self.head_fc(norm(h))).square())
        else:
            h = self.head_lin(h)
        if nonempty is not None:
            h = h * nonempty[:, None].to(h.dtype)
        return h
