"""
LensNet: score every working-context entry in [-1, 1]; + = worth more detail, - = can be coarser.

Input: a WorkingContext (or its tensors) with R rows of L (padded) entry slots. Per entry e:
    x_e = W_in norm(emb_e)                           its embedding projected down to d_model
        + E_lod[lod_e]                               a learned vector per level of detail
        + W_f [log span_len_e, log(1 + T_end - span_end_e), 1]
where span_end = span_start + span_len and T_end = the row's largest span_end over valid entries (the
end of the history the row covers), so the newest entry has distance log 1 = 0. No slot index is
used: a row's scores do not depend on how it was padded or aligned.

Then `layers` pre-norm blocks, bidirectional over the row's entries:
    x = x + Attn(norm(x)),  x = x + MLP(norm(x))
(QK-norm, F.scaled_dot_product_attention with the key-padding mask, so padding is never attended to;
MLP = relu(x W1)^2 W2, 4x hidden; norm = RMSNorm without parameters; no biases; no rotary: order
information comes from the distance feature). Head:
    "mlp":    score = tanh(w . relu(W1 norm(x))^2 / 4d)
    "linear": score = tanh(w . norm(x) / d)
The readout is divided by its fan-in (muP-style): an optimizer step moves each of w's weights by about
lr, all in a coherent direction early on, so an unscaled sum would move the pre-tanh score by ~lr * fan_in
per step; measured (lab notebook, 2026-11-23): without the division every score reached ±1 (tanh
saturated, zero gradient, preference corr 0) within ~20 steps of MC training, with Muon or AdamW.
Padding slots get score 0.

Initialisation: input projections U(-a, a), a = sqrt(3 / fan_in); the lod table N(0, 1); every output
projection (attention, MLP) zero, and the head's final vector w zero. A fresh LensNet therefore scores
every entry exactly 0 ("no opinion"; with the content match, every entry whose span nothing singles out), and the allocator does nothing until the preference loss
(mc/train/lens_loss.py) has taught it something. Gradients reach w at once and the rest from step 2.

Content match (match=True, --lensnet_match=1): a score also reads how strongly the entry's span holds
what the tail of the history asks about,
    score_e = tanh(net_e + g * m_e)        m_e = relu(z_e - 3), z_e = the best keymatch block score in
                                                 the span (mc/keymatch.py: entry_match)
with g a learned scalar, initialised to 1: before training a block that stands one std beyond "asked
about" scores tanh(1) = 0.76 (every other entry 0), and the preference loss then moves g with the rest
(init 0 reached only g = 0.26 in 400 steps, too little to outweigh the network's learned recency
preference for the middle of a long history; lab notebook). Why: a gist cannot carry every
fact of its span (a LOD2 gist of 1,024 tokens of dense key/value facts holds ~100 of them in one
vector), so a LensNet that reads gists only cannot tell which of 60 far gists holds the fact a question
asks for (measured: MC-LensNet 0.00 exact match at 16W on the recall checkpoint, lab notebook). The
GPT's layer-0 keys of the raw tokens can (MC-KEYMATCH 1.00 there). The match term sits outside the
network, so a child of an expanded gist is scored by its own match without another network pass
(mc/focus.py builds that per-token map from logits()).

By default the input embeddings are detached (detach_inputs=True): LensNet's loss trains LensNet only,
not GistNet or the token embeddings it reads.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mc.blocks import BidirectionalBlock
from nanochat.gpt import norm


class LensNet(nn.Module):
    NUM_FEATURES = 3

    def __init__(self, n_embd: int, layers: int = 2, n_head: int = 4, head: str = "mlp", d_model: int | None = None,
                 max_lod: int = 4, detach_inputs: bool = True, match: bool = False):
        super().__init__()
        if head not in ("mlp", "linear"):
            raise ValueError(f"--lensnet_head={head!r} is not one of mlp, linear")
        if layers < 1:
            raise ValueError(f"--lensnet_layers={layers} must be >= 1")
        if d_model is None:
            d_model = min(n_embd, 128)
        if d_model % n_head:
            raise ValueError(f"LensNet needs d_model={d_model} divisible by n_head={n_head}")
        self.n_embd, self.d_model, self.n_head, self.head = n_embd, d_model, n_head, head
        self.max_lod, self.detach_inputs = max_lod, detach_inputs
        self.in_proj = nn.Linear(n_embd, d_model, bias=False)
        self.lod_emb = nn.Embedding(max_lod + 1, d_model)
        self.feat_proj = nn.Linear(self.NUM_FEATURES, d_model, bias=False)
        self.blocks = nn.ModuleList([BidirectionalBlock(d_model, n_head) for _ in range(layers)])
        if head == "mlp":
            self.head_fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.head_out = nn.Linear(4 * d_model if head == "mlp" else d_model, 1, bias=False)
        self.match = match
        if match:
            self.match_gain = nn.Parameter(torch.ones(()))  # g: how much the content match counts
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Deterministic given the torch seed; a fresh LensNet scores every entry 0 (module docstring)."""
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "c_mlp.weight", "head_out.weight")):
                nn.init.zeros_(p)
            elif name == "match_gain":
                nn.init.ones_(p)
            elif name == "lod_emb.weight":
                nn.init.normal_(p)
            else:
                bound = math.sqrt(3.0 / p.size(1))
                nn.init.uniform_(p, -bound, bound)

    def matrix_params(self) -> list:
        """2D weight matrices (for Muon): projections and block weights (not the lod table, not the head)."""
        return [p for n, p in self.named_parameters() if p.ndim == 2 and n not in ("lod_emb.weight", "head_out.weight")]

    def vector_params(self) -> list:
        """Everything else (for AdamW): the lod embedding table and the 1-output head."""
        return [p for n, p in self.named_parameters() if p.ndim != 2 or n in ("lod_emb.weight", "head_out.weight")]

    def forward(self, wc=None, *, embeddings=None, lod=None, span_start=None, span_len=None, valid=None,
                match=None) -> torch.Tensor:
        """wc: a WorkingContext, or the tensors by keyword: embeddings [R, L, C], lod, span_start, span_len
        (long [R, L]) and valid (bool [R, L]); match: float [R, L] content-match strengths m_e (required
        when the LensNet was built with match=True). Returns scores [R, L] in [-1, 1], 0 at padding."""
        logits = self.logits(wc, embeddings=embeddings, lod=lod, span_start=span_start, span_len=span_len,
                             valid=valid, match=match)
        valid = wc.valid if wc is not None else valid
        return torch.tanh(logits) * valid.to(logits.dtype)

    def logits(self, wc=None, *, embeddings=None, lod=None, span_start=None, span_len=None, valid=None,
               match=None) -> torch.Tensor:
        """[R, L] pre-tanh scores net_e + g * m_e (forward's arguments)."""
        if wc is not None:
            embeddings, lod, span_start, span_len, valid = wc.embeddings, wc.lod, wc.span_start, wc.span_len, wc.valid
        if embeddings is None or embeddings.ndim != 3 or embeddings.size(-1) != self.n_embd:
            got = None if embeddings is None else tuple(embeddings.shape)
            raise ValueError(f"LensNet expects embeddings [R, L, {self.n_embd}], got {got}")
        R, L, _ = embeddings.shape
        for name, t in (("lod", lod), ("span_start", span_start), ("span_len", span_len), ("valid", valid)):
            if t is None or t.shape != (R, L):
                raise ValueError(f"LensNet: {name} must be [R, L] = [{R}, {L}], got {None if t is None else tuple(t.shape)}")
        if valid.dtype != torch.bool:
            raise ValueError(f"LensNet: valid must be bool, got {valid.dtype}")
        if self.match and (match is None or match.shape != (R, L)):
            raise ValueError(f"this LensNet reads the content match (--lensnet_match=1): pass match [R, L] = "
                             f"[{R}, {L}] (mc.keymatch.entry_match), got {None if match is None else tuple(match.shape)}")
        dtype = self.in_proj.weight.dtype
        emb = embeddings.detach() if self.detach_inputs else embeddings
        emb = torch.where(valid[..., None], emb, torch.zeros((), dtype=emb.dtype, device=emb.device)).to(dtype)
        span_end = (span_start + span_len).masked_fill(~valid, 0)
        t_end = span_end.max(1, keepdim=True).values
        dist = (t_end - span_end).clamp(min=0).to(torch.float32)
        feats = torch.stack([span_len.clamp(min=1).to(torch.float32).log(), torch.log1p(dist),
                             torch.ones_like(dist)], dim=-1)
        feats = feats * valid[..., None]
        x = (self.in_proj(norm(emb)) + self.lod_emb(lod.clamp(0, self.max_lod)) + self.feat_proj(feats.to(dtype)))
        # keys: valid entries only; a row with none attends to everything (its scores are zeroed below)
        attn_mask = (valid | ~valid.any(1, keepdim=True))[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask)
        if self.head == "mlp":
            h = F.relu(self.head_fc(norm(x))).square()
        else:
            h = norm(x)
        # readout / fan_in (muP-style): an optimizer step moves every head weight by ~lr in a coherent
        # direction, so an unscaled sum over 4d inputs would move the pre-tanh score by ~lr * 2d per
        # step and saturate tanh (zero gradient, every entry at -1 or +1) within a few steps
        net = self.head_out(h).squeeze(-1) / h.size(-1)
        if self.match:
            net = net + self.match_gain.to(net.dtype) * match.to(net.dtype)
        return net
