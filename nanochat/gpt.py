"""
The GPT model: a small decoder-only transformer, nanochat style.

- token embedding (wte) -> RMSNorm -> [previous-token mix] -> n_layer blocks -> RMSNorm -> untied lm_head
  -> logit softcap
- every block: x + attn(norm(x)), then x + mlp(norm(x)); norms are parameter-free (F.rms_norm)
- attention: rotary position embeddings (base 10000), QK-norm, grouped-query attention
  (n_kv_head key/value heads shared by n_head query heads), F.scaled_dot_product_attention
- MLP: 4x hidden, relu(x)^2; no biases anywhere
- three options for recall (all off by default, so the model is upstream's):
  prev_token_mix = k: x[t] += lambda * W [x[t-1]; ...; x[t-k]] after the embedding norm, W a learned
    d x kd matrix (orthogonal init, trained by Muon), lambda a learned scalar (init 1). It writes the
    previous k tokens into their own subspace of the residual stream, so "find the position whose
    PREVIOUS token is my token, copy its token" (key -> value lookup, induction) is a one-layer circuit
    instead of two; k = 2 also reaches a key one token further back ("cobalt" in "cobalt=113").
  query_gain: a learned per-head gain on the normed queries (init query_gain; 0 = none, as upstream).
    QK-norm gives q and k unit RMS, so q.k / sqrt(head_dim) <= sqrt(head_dim): 5.7 at head_dim 32, where
    one matching key among 2,047 others gets at most e^5.7 / (e^5.7 + 2047) = 12% of the attention. A
    gain g lifts the bound to g sqrt(head_dim), so one position can win at long range.
  rope_fraction: the fraction of each head's rotary pairs that rotate. The slowest pairs are left
    unrotated (frequency 0), so part of every head matches on content at any distance; with every
    pair rotating, recall fails past the longest trained length.
- forward() takes token ids OR input embeddings (MegaContext feeds gists as embeddings), optional
  per-sample rotary cos/sin (gists sit at chosen positions), a key-padding mask (packed right-aligned
  variants), and a KV cache (decoding)
- setup_optimizers(): AdamW for the embedding and head, Muon for the block matrices, with hooks for
  extra modules (GistNet, LensNet) to join the same two optimizers
- generate(): prefill + KV-cache decode, yields token ids
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanochat.adamw import DistAdamW
from nanochat.kv_cache import KVCache
from nanochat.muon import DistMuon, Muon


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA): n_head % n_kv_head == 0
    n_embd: int = 768
    softcap: float = 15.0  # logits = softcap * tanh(logits / softcap); 0 disables
    prev_token_mix: int = 0  # k: x[t] += lambda * W [x[t-1]..x[t-k]] after the embedding norm; 0 = off
    query_gain: float = 0.0  # init of a learned per-head gain on the normed queries; 0 = none (upstream)
    rope_fraction: float = 1.0  # fraction of rotary pairs that rotate (the fastest); the rest stay unrotated

    def __post_init__(self):
        # sizes first: a 0 here would otherwise surface as a ZeroDivisionError deep inside GPT.__init__
        bad = [f"{k}={getattr(self, k)!r}" for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head",
                                                     "n_embd")
               if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
        if bad:
            raise ValueError(f"model sizes must be integers >= 1: {', '.join(bad)}")
        if not math.isfinite(self.softcap) or self.softcap < 0:
            raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {self.softcap!r}")
        if self.prev_token_mix < 0 or self.query_gain < 0 or not 0.0 <= self.rope_fraction <= 1.0:
            raise ValueError(f"recall options out of range: --prev_token_mix={self.prev_token_mix} (>= 0), "
                             f"--query_gain={self.query_gain} (>= 0), --rope_fraction={self.rope_fraction} (in [0, 1])")


def norm(x):
    """Parameter-free RMSNorm over the last dim: x / sqrt(mean(x^2) + eps)."""
    return F.rms_norm(x, (x.size(-1),))


def rope_inv_freq(head_dim, base=10000.0, rope_fraction=1.0, device=None):
    """[head_dim/2] float32 rotary frequencies: pair i rotates at base^(-2i/head_dim) radians per position.

    Fast pairs (small i) encode local order, slow pairs long range. With rope_fraction < 1 only the first
    round(rope_fraction * head_dim/2) pairs rotate; the slowest ones get frequency 0 (cos 1, sin 0 at every
    position), so their q.k is pure content, the same at any distance. Frequency 0 is also what every
    consumer of this table needs for free: a Gaussian-RoPE gist (mc/positions.py) damps a pair by
    exp(-(freq * sigma)^2 / 2) = 1 there, so gists respect the same split.
    """
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    if not 0.0 <= rope_fraction <= 1.0:
        raise ValueError(f"rope_fraction must be in [0, 1], got {rope_fraction}")
    pairs = head_dim // 2
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    inv_freq[round(rope_fraction * pairs):] = 0.0
    return inv_freq


def rotary_cos_sin(positions, head_dim, base=10000.0, rope_fraction=1.0):
    """Rotary tables for arbitrary (even fractional) positions.

    positions: [..., T] (any float/int tensor) -> cos, sin: [..., T, 1, head_dim/2] float32, with
    angle(t, i) = t * rope_inv_freq(...)[i]. The singleton dim broadcasts over heads in [B, T, H, head_dim].
    """
    inv_freq = rope_inv_freq(head_dim, base, rope_fraction, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., T, head_dim/2]
    return angles.cos()[..., None, :], angles.sin()[..., None, :]


def apply_rotary_emb(x, cos, sin):
    """Rotate channel pairs (x1[i], x2[i]) = (x[..., i], x[..., i + D/2]) by each position's angle.

    x: [B, T, H, D]; cos/sin: [B or 1, T, 1, D/2]. A 2D rotation by angle a:
        y1 = x1 cos a - x2 sin a,   y2 = x1 sin a + x2 cos a
    so q.k after rotation depends only on the position difference (relative attention).
    """
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if config.query_gain:
            self.q_gain = nn.Parameter(torch.full((self.n_head, 1), float(config.query_gain)))  # AdamW

    def forward(self, x, cos_sin, kv_cache, attn_mask, is_causal):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        # rotary, then QK-norm. A rotation keeps each vector's RMS, so the order does not matter
        # mathematically; the norm bounds q.k (no attention-logit blow-up) whatever the weights do.
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if hasattr(self, "q_gain"):
            q = q * self.q_gain.to(q.dtype)[:, :, None]  # [H, 1, 1] over [B, H, T, D]
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # [B, H_kv, T_keys, D]
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.n_kv_head != self.n_head:  # GQA: each kv head serves n_head / n_kv_head query heads
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache, attn_mask, is_causal):
        x = x + self.attn(norm(x), cos_sin, kv_cache, attn_mask, is_causal)
        return x + self.mlp(norm(x))


def attention_mask(Tq, Tk, key_padding_mask, device):
    """(attn_mask, is_causal) for SDPA. Queries are the last Tq of Tk positions (Tk - Tq are cached).

    Without padding this is plain causal (is_causal=True, or no mask for a 1-token decode step, or a
    [Tq, Tk] causal mask with an offset after a cache prefix). With key_padding_mask [B, Tk] (True =
    real) it is a bool [B, 1, Tq, Tk] mask: causal AND key is real, OR key is the query itself. The
    last term keeps a padding query's row non-empty (an all-False row makes SDPA return NaN); real
    queries never see padding because their own key is real.
    """
    if key_padding_mask is None:
        if Tq == 1:
            return None, False
        if Tq == Tk:
            return None, True
    q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    k_pos = torch.arange(Tk, device=device)[None, :]
    causal = k_pos <= q_pos  # [Tq, Tk]
    if key_padding_mask is None:
        return causal, False
    mask = (causal[None] & key_padding_mask[:, None, :]) | (k_pos == q_pos)[None]
    return mask[:, None], False


def previous_inputs(x, k, kv_cache=None, key_padding_mask=None):
    """x [B, T, D] -> [B, T, k*D]: row t holds [x[t-1]; x[t-2]; ...; x[t-k]], the k previous inputs.

    Zero where there is no such token: before the sequence start, and at positions that are padding
    (packed rows are right-aligned, so a row's first real tokens follow padding). While decoding, the
    inputs before this chunk come from the cache (kv_cache.insert_inputs), which also keeps them across
    set_pos truncations (re-prefill).
    """
    B, T, D = x.shape
    pos = kv_cache.get_pos() if kv_cache is not None else 0
    before = kv_cache.insert_inputs(x, k) if kv_cache is not None else x.new_zeros(B, k, D)  # x[pos-k..pos-1]
    seq = torch.cat([before, x], dim=1)  # seq[:, k + t] = x[t]
    lags = torch.cat([seq[:, k - j:k - j + T] for j in range(1, k + 1)], dim=-1)
    if key_padding_mask is not None:  # [B, pos + T], True = real; position t - j is column pos + t - j
        real = torch.cat([key_padding_mask.new_zeros(B, k), key_padding_mask], dim=1)[:, pos:]
        real = torch.stack([real[:, k - j:k - j + T] for j in range(1, k + 1)], dim=-1)  # [B, T, k]
        lags = (lags.view(B, T, k, D) * real[..., None].to(x.dtype)).view(B, T, k * D)
    return lags


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
        if config.n_head % config.n_kv_head:
            raise ValueError(f"n_head={config.n_head} must be a multiple of n_kv_head={config.n_kv_head}")
        self.config = config
        self.head_dim = config.n_embd // config.n_head
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.prev_token_mix:
            self.prev_mix = nn.Linear(config.prev_token_mix * config.n_embd, config.n_embd, bias=False)  # W (Muon)
            self.prev_mix_lambda = nn.Parameter(torch.ones(1))  # lambda (AdamW)
        # rotary tables for 10x the training length (room for long decodes); not saved in checkpoints
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary_table()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_table(self):
        positions = torch.arange(self.rotary_len, dtype=torch.float32, device=self.lm_head.weight.device)
        cos, sin = rotary_cos_sin(positions, self.head_dim, rope_fraction=self.config.rope_fraction)
        return cos[None], sin[None]  # [1, rotary_len, 1, head_dim/2]

    @torch.no_grad()
    def init_weights(self):
        """Deterministic given the torch seed. Every block input is RMS-normed (unit RMS), so:
        - input projections (c_q, c_k, c_v, c_fc): uniform with std 1/sqrt(fan_in) -> unit-scale outputs
        - output projections (attn and mlp c_proj): zero, so each block starts as the identity and
          the residual stream is exactly the embedding at step 0 (gradients still reach them)
        - wte: normal std 1 (it is RMS-normed right after lookup anyway)
        - lm_head: normal std 0.001 -> near-uniform predictions, loss starts at ~ln(vocab)
        - prev_mix W: orthogonal (orthonormal rows; for k = 1 it keeps the unit RMS of the normed previous
          token), lambda 1
        Also recomputes the rotary buffers (needed after meta-device construction + to_empty)."""
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / lin.in_features)  # U(-a, a) has std a / sqrt(3)
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for block in self.transformer.h:
            if hasattr(block.attn, "q_gain"):
                block.attn.q_gain.fill_(self.config.query_gain)
        if self.config.prev_token_mix:
            nn.init.orthogonal_(self.prev_mix.weight)
            self.prev_mix_lambda.fill_(1.0)
        cos, sin = self._rotary_table()
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 * N_non_embedding + 12 * n_layer * n_head * head_dim * seq_len.

        6N: each weight does one multiply-add (2 FLOPs) per token forward and twice that backward
        (grad w.r.t. input and w.r.t. weight). The embedding is a lookup, not a matmul, so it is left
        out (lm_head is a real matmul and stays in). Attention scores add, per layer and token,
        q.k over seq_len keys and the weighted sum of values: 2 * 2 * n_head * head_dim * seq_len
        forward, x3 for forward + backward = 12 * n_head * head_dim * seq_len (full length counted,
        the usual convention, although causal masking skips about half of it).
        """
        c = self.config
        n_non_embedding = self.num_params() - self.transformer.wte.weight.numel()
        return 6.0 * n_non_embedding + 12.0 * c.n_layer * c.n_head * self.head_dim * c.sequence_len

    # ------------------------------------------------------------------ optimizers
    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         adam_betas=(0.8, 0.95), extra_matrix_params=(), extra_adam_params=(), average_grads=True):
        """[AdamW, Muon]. Every param group carries "initial_lr" (schedule: lr = initial_lr * multiplier).

        AdamW: lm_head (unembedding_lr) and wte (embedding_lr), both times (n_embd / 768) ** -0.5.
        The rates were tuned at width 768. Adam moves every coordinate by about lr per step, whatever
        the width; a logit is a dot product over n_embd coordinates whose updates add up like a random
        walk, so its change grows ~ sqrt(n_embd). Scaling lr by 1/sqrt(n_embd / 768) keeps the
        per-step change of the model's outputs about the same at every width.
        Muon: every 2D matrix in the blocks at matrix_lr (Muon's update is orthogonalized and shape-
        scaled already, so no width correction).
        extra_matrix_params: more 2D matrices for Muon (GistNet/LensNet weights).
        extra_adam_params: tensors (one group at the scaled unembedding lr) or param-group dicts
        ({"params": [...], "lr": ...}; lr defaults to that same rate) for AdamW (gains, vectors...).
        Under torch.distributed the DistAdamW / DistMuon variants are used; they average gradients
        unless average_grads=False (the trainer averages itself so it can clip the global norm).
        """
        scale = (self.config.n_embd / 768) ** -0.5
        gains = [b.attn.q_gain for b in self.transformer.h if hasattr(b.attn, "q_gain")]
        matrix_params = [p for n, p in self.transformer.h.named_parameters() if not n.endswith("q_gain")]
        if gains:
            extra_adam_params = [*gains, *extra_adam_params]
        if self.config.prev_token_mix:
            matrix_params.append(self.prev_mix.weight)
            extra_adam_params = [self.prev_mix_lambda, *extra_adam_params]
        matrix_params += list(extra_matrix_params)
        for p in matrix_params:
            if p.ndim != 2:
                raise ValueError(f"Muon only takes 2D matrices; got a parameter of shape {tuple(p.shape)} — "
                                 "pass vectors/scalars through extra_adam_params instead")
        adam_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * scale),
        ]
        loose = []
        for item in extra_adam_params:
            if isinstance(item, dict):
                adam_groups.append({"lr": unembedding_lr * scale, **item})
            else:
                loose.append(item)
        if loose:
            adam_groups.append(dict(params=loose, lr=unembedding_lr * scale))
        # every model parameter in exactly one optimizer
        seen = [id(p) for g in adam_groups for p in g["params"]] + [id(p) for p in matrix_params]
        if len(seen) != len(set(seen)):
            raise ValueError("a parameter was given to the optimizers twice (check extra_*_params)")
        missing = [n for n, p in self.named_parameters() if id(p) not in set(seen)]
        if missing:
            raise ValueError(f"parameters not covered by any optimizer: {missing}")

        distributed = dist.is_available() and dist.is_initialized()
        adam_kwargs = dict(betas=adam_betas, eps=1e-10, weight_decay=weight_decay)
        if distributed:
            adamw = DistAdamW(adam_groups, average_grads=average_grads, **adam_kwargs)
        else:
            fused = self.get_device().type == "cuda"
            adamw = torch.optim.AdamW(adam_groups, fused=fused, **adam_kwargs)
        if distributed:
            muon = DistMuon(matrix_params, average_grads=average_grads, lr=matrix_lr, momentum=0.95)
        else:
            muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    # ------------------------------------------------------------------ forward
    def _rotary(self, B, T, pos, cos_sin_override):
        if cos_sin_override is None:
            if pos + T > self.rotary_len:
                raise ValueError(f"positions {pos}..{pos + T} pass the rotary table ({self.rotary_len} = "
                                 "10 x sequence_len); raise sequence_len or pass cos_sin_override")
            return self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        cos, sin = cos_sin_override
        want = (T, 1, self.head_dim // 2)
        for t in (cos, sin):
            if t.ndim != 4 or tuple(t.shape[1:]) != want or t.size(0) not in (1, B):
                raise ValueError(f"cos_sin_override tensors must be [B or 1, T, 1, head_dim/2] = "
                                 f"[{B} or 1, {T}, 1, {self.head_dim // 2}], got {tuple(t.shape)}")
        return cos, sin

    def forward(self, idx=None, targets=None, kv_cache=None, inputs_embeds=None, cos_sin_override=None,
                key_padding_mask=None, loss_reduction="mean", last_only=False):
        """idx [B, T] long OR inputs_embeds [B, T, n_embd].

        targets [B, T] long (-1 = ignore) -> loss: 'mean' (scalar over non-ignored targets; 0 with a
        gradient if all are ignored), 'sum', or 'none' ([B, T], 0 where ignored). Without targets:
        float32 logits [B, T, vocab].
        kv_cache: positions continue from kv_cache.get_pos(); keys/values are appended to it.
        cos_sin_override: (cos, sin) each [B or 1, T, 1, head_dim/2], per-sample rotary positions.
        key_padding_mask: bool, True = real token; [B, T], or [B, cached + T] with a kv_cache.
        Padding keys are never attended to; outputs at padding positions are meaningless (finite).
        last_only (no targets): logits of the last position only, [B, 1, vocab] -- a prefill that only
        needs the next-token distribution skips the T x vocab head matmul (MC re-prefill, mc/infer/session.py).
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) or inputs_embeds")
        if idx is not None:
            if idx.ndim != 2:
                raise ValueError(f"idx must be [B, T], got shape {tuple(idx.shape)}")
            x = self.transformer.wte(idx)
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.size(-1) != self.config.n_embd:
                raise ValueError(f"inputs_embeds must be [B, T, {self.config.n_embd}], got {tuple(inputs_embeds.shape)}")
            x = inputs_embeds
        B, T, _ = x.shape
        pos = kv_cache.get_pos() if kv_cache is not None else 0
        cos_sin = self._rotary(B, T, pos, cos_sin_override)
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, pos + T):
                raise ValueError(f"key_padding_mask must be a bool [B, cached + T] = [{B}, {pos + T}] tensor "
                                 f"(True = real token), got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        attn_mask, is_causal = attention_mask(T, pos + T, key_padding_mask, x.device)

        x = self.mix_previous(norm(x), kv_cache, key_padding_mask)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, attn_mask, is_causal)
        x = norm(x)
        if last_only:
            if targets is not None:
                raise ValueError("last_only=True returns logits; it cannot be combined with targets")
            x = x[:, -1:]
        logits = self.lm_head(x).float()
        if self.config.softcap:
            s = self.config.softcap
            logits = s * torch.tanh(logits / s)  # smooth clamp to (-s, s)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction="none").view(B, T)  # 0 at ignored positions
        if loss_reduction == "none":
            return loss
        if loss_reduction == "sum":
            return loss.sum()
        if loss_reduction == "mean":
            return loss.sum() / (targets != -1).sum().clamp(min=1)
        raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")

    def mix_previous(self, x, kv_cache=None, key_padding_mask=None):
        """The previous-token mix on normed inputs x [B, T, D] (identity when prev_token_mix is 0)."""
        k = int(self.config.prev_token_mix)
        if not k:
            return x
        return x + self.prev_mix_lambda * self.prev_mix(previous_inputs(x, k, kv_cache, key_padding_mask))

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Prefill `tokens` (list of ints) into a KV cache, then decode one token at a time.
        Yields ints. temperature 0 = greedy; top_k keeps the k most likely tokens before sampling."""
        if not tokens:
            raise ValueError("generate needs at least one prompt token (e.g. the BOS token)")
        device = self.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        cache = KVCache(1, self.config.n_kv_head, len(tokens) + max_tokens, self.head_dim, self.config.n_layer,
                        device=device)
        logits = self.forward(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=cache)[:, -1]
        for i in range(max_tokens):
            nxt = sample_next_token(logits, rng, temperature, top_k)  # [1, 1]
            yield nxt.item()
            if i + 1 < max_tokens:
                logits = self.forward(nxt, kv_cache=cache)[:, -1]


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits [B, V] -> next ids [B, 1]. temperature 0: argmax; else softmax(logits / T) over top_k
    (None or 0 = every token, as the CLIs' `-k 0` promises; topk(0) would leave nothing to sample)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, ids = torch.topk(logits, k, dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        return ids.gather(-1, torch.multinomial(probs, 1, generator=rng))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=rng)
