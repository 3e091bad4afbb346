"""
The bidirectional transformer block GistNet and LensNet share: every position of a row attends to every
real position of the same row (a key-padding mask keeps padding out), pre-norm, no biases, as the GPT's
blocks are built (nanochat/gpt.py: parameter-free RMSNorm, QK-norm, relu² MLP with 4x hidden):

    x = x + W_o Attn(q, k, v),   q, k, v = split(W_qkv norm(x)),  q, k <- norm(rotary(q)), norm(rotary(k))
    x = x + W_2 relu(W_1 norm(x))^2

Rotary is optional: GistNet rotates by the in-block index (cos, sin [S, 1, D/2], nanochat.gpt's pairing),
LensNet passes none (order comes from its distance feature). Weight names (c_qkv, c_proj, c_fc, c_mlp)
are the ones both networks' checkpoints hold.
"""

import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import apply_rotary_emb, norm


class BidirectionalBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_qkv = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.c_mlp = nn.Linear(4 * d, d, bias=False)

    def forward(self, x, attn_mask, cos=None, sin=None):
        """x [N, S, d]; attn_mask broadcastable to [N, H, S, S] (bool, True = may attend); cos/sin or None."""
        N, S, D = x.shape
        H = self.n_head
        q, k, v = self.c_qkv(norm(x)).view(N, S, 3, H, D // H).unbind(2)
        if cos is not None:
            q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
        x = x + self.c_proj(y.transpose(1, 2).reshape(N, S, D))
        return x + self.c_mlp(F.relu(self.c_fc(norm(x))).square())
