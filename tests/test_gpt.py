"""Tests for nanochat/gpt.py and nanochat/kv_cache.py: shapes, losses, embeddings input, rotary
overrides, padding masks, GQA, softcap, KV-cache decoding, generation, overfitting, FLOPs."""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache

V = 64


def make_model(seed=0, sharp=True, **overrides):
    """Tiny fp32 CPU model. sharp=True gives lm_head a larger init so argmax has no near-ties."""
    cfg = dict(sequence_len=32, vocab_size=V, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, softcap=15.0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    model.init_weights()
    with torch.no_grad():
        if sharp:
            torch.nn.init.normal_(model.lm_head.weight, std=0.5)
        for block in model.transformer.h:  # non-zero output projections so every path matters
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
    model.eval()
    return model


def tokens(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def test_forward_shapes_and_dtype():
    model = make_model()
    x = tokens(3, 16)
    logits = model(x)
    assert logits.shape == (3, 16, V) and logits.dtype == torch.float32
    loss = model(x, targets=tokens(3, 16, seed=2))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_loss_none_vs_mean_and_ignore_index():
    model = make_model()
    x, y = tokens(2, 16), tokens(2, 16, seed=2)
    y[0, :5] = -1
    y[1, -3:] = -1
    per_tok = model(x, targets=y, loss_reduction="none")
    assert per_tok.shape == (2, 16)
    assert torch.all(per_tok[y == -1] == 0)
    mean = model(x, targets=y)
    torch.testing.assert_close(mean, per_tok.sum() / (y != -1).sum())
    # manual cross-entropy on the kept positions
    logits = model(x)
    keep = y != -1
    ref = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(mean, ref)
    # all ignored: 0, not NaN, and still differentiable
    model.train()
    loss = model(x, targets=torch.full_like(y, -1))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="loss_reduction"):
        model(x, targets=y, loss_reduction="avg")


def test_idx_vs_inputs_embeds():
    model = make_model()
    x = tokens(2, 12)
    a = model(x)
    b = model(inputs_embeds=model.transformer.wte(x))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model(x, inputs_embeds=model.transformer.wte(x))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_cos_sin_override():
    model = make_model()
    T = 10
    x = tokens(2, T)
    base = model(x)
    same = model(x, cos_sin_override=(model.cos[:, :T], model.sin[:, :T]))
    torch.testing.assert_close(base, same, rtol=0, atol=0)
    # per-sample: sample 1 gets positions with a gap (0..4, then 20..24), sample 0 the default 0..T.
    # (A uniform shift would change nothing: rotary attention only sees position differences.)
    pos1 = torch.cat([torch.arange(5), torch.arange(20, 20 + T - 5)])
    cos = torch.cat([model.cos[:, :T], model.cos[:, pos1]])
    sin = torch.cat([model.sin[:, :T], model.sin[:, pos1]])
    out = model(x, cos_sin_override=(cos, sin))
    ref0 = model(x[:1])
    ref1 = model(x[1:], cos_sin_override=(model.cos[:, pos1], model.sin[:, pos1]))
    torch.testing.assert_close(out[:1], ref0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], ref1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:1], base[:1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[1:], base[1:], atol=1e-3)
    torch.testing.assert_close(out[1:, :5], base[1:, :5], rtol=1e-5, atol=1e-5)  # causal: before the gap
    # shift invariance: all positions + 7 gives the same output
    shifted = model(x, cos_sin_override=(model.cos[:, 7:7 + T], model.sin[:, 7:7 + T]))
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cos_sin_override"):
        model(x, cos_sin_override=(model.cos[:, :T + 1], model.sin[:, :T + 1]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_key_padding_mask(side):
    model = make_model()
    T, P = 12, 4
    x = tokens(2, T)
    mask = torch.ones(2, T, dtype=torch.bool)
    pad = slice(0, P) if side == "left" else slice(T - P, T)
    mask[1, pad] = False
    out_a = model(x, key_padding_mask=mask)
    x2 = x.clone()
    x2[1, pad] = (x2[1, pad] + 7) % V  # different content under the padding
    out_b = model(x2, key_padding_mask=mask)
    assert torch.isfinite(out_a).all() and torch.isfinite(out_b).all()
    torch.testing.assert_close(out_a[mask], out_b[mask], rtol=0, atol=0)
    torch.testing.assert_close(out_a[0], model(x[:1])[0], rtol=1e-5, atol=1e-5)  # unpadded row untouched
    # backward through a padded batch stays finite
    model.train()
    y = x.clone()
    y[~mask] = -1
    model(x, targets=y, key_padding_mask=mask).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_left_padding_with_shifted_positions_matches_unpadded():
    """The packing MegaContext uses: right-aligned rows, padding on the left, real tokens at positions 0.."""
    model = make_model()
    T, P = 12, 5
    x = tokens(1, T)
    real = x[:, P:]
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[:, :P] = False
    pos = (torch.arange(T) - P).clamp(min=0).float()
    cos, sin = model.cos[:, pos.long()], model.sin[:, pos.long()]
    out = model(x, key_padding_mask=mask, cos_sin_override=(cos, sin))
    torch.testing.assert_close(out[:, P:], model(real), rtol=1e-5, atol=1e-5)


def test_fully_padded_row_has_no_nan():
    model = make_model()
    x = tokens(2, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1] = False
    assert torch.isfinite(model(x, key_padding_mask=mask)).all()
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(x, key_padding_mask=mask.long())


def test_gqa_config():
    model = make_model(n_head=4, n_kv_head=2)
    assert model.transformer.h[0].attn.c_k.weight.shape == (2 * 8, 32)
    x = tokens(2, 10)
    assert model(x).shape == (2, 10, V)
    assert model(x, targets=x).ndim == 0
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT(GPTConfig(sequence_len=8, vocab_size=V, n_layer=1, n_head=4, n_kv_head=3, n_embd=32))


def test_softcap_bounds_logits():
    model = make_model(softcap=3.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    logits = model(tokens(2, 8))
    assert logits.abs().max() <= 3.0 and logits.abs().max() > 2.9
    uncapped = make_model(softcap=0.0)
    with torch.no_grad():
        uncapped.lm_head.weight.mul_(100.0)
    assert uncapped(tokens(2, 8)).abs().max() > 3.0


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_decode_matches_full_forward(n_kv_head):
    model = make_model(n_kv_head=n_kv_head)
    B, T = 2, 20
    x = tokens(B, T)
    full = model(x)
    cache = KVCache(B, n_kv_head, 6, model.head_dim, model.config.n_layer, dtype=torch.float32)
    first_capacity = cache.capacity
    got = [model(x[:, :5], kv_cache=cache)]  # prefill 5
    got.append(model(x[:, 5:9], kv_cache=cache))  # a chunk of 4 after a cached prefix (offset mask)
    for t in range(9, T):  # then one token at a time
        got.append(model(x[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_pos() == T and cache.capacity > first_capacity >= 6
    # truncate and redo the tail: same logits again
    cache.set_pos(12)
    redo = model(x[:, 12:], kv_cache=cache)
    torch.testing.assert_close(redo, full[:, 12:], rtol=1e-5, atol=1e-5)
    cache.reset()
    assert cache.get_pos() == 0


def test_kv_cache_with_padding_mask_over_cached_keys():
    model = make_model()
    T, P = 10, 3
    x = tokens(1, T)
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[:, :P] = False
    full = model(x, key_padding_mask=mask)
    cache = KVCache(1, 4, 4, model.head_dim, model.config.n_layer)  # lazy dtype
    a = model(x[:, :6], kv_cache=cache, key_padding_mask=mask[:, :6])
    b = model(x[:, 6:], kv_cache=cache, key_padding_mask=mask)
    torch.testing.assert_close(torch.cat([a, b], 1)[mask], full[mask], rtol=1e-5, atol=1e-5)


def test_kv_cache_prefill_broadcast():
    model = make_model()
    x = tokens(1, 7)
    src = KVCache(1, 4, 8, model.head_dim, model.config.n_layer)
    model(x, kv_cache=src)
    dst = KVCache(3, 4, 4, model.head_dim, model.config.n_layer, dtype=torch.float32)
    dst.prefill(src)
    assert dst.get_pos() == 7
    nxt = tokens(3, 1, seed=5)
    out = model(nxt, kv_cache=dst)
    for i in range(3):
        ref = model(torch.cat([x, nxt[i:i + 1]], 1))[:, -1:]
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)


def test_generate_greedy():
    model = make_model()
    prompt = [1, 2, 3, 4]
    a = list(model.generate(prompt, 12, temperature=0.0))
    b = list(model.generate(prompt, 12, temperature=0.0))
    assert a == b and len(a) == 12 and all(isinstance(t, int) for t in a)
    seq = list(prompt)
    for _ in range(12):  # greedy by full forward, no cache
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert a == seq[len(prompt):]
    s1 = list(model.generate(prompt, 12, temperature=1.0, top_k=5, seed=3))
    s2 = list(model.generate(prompt, 12, temperature=1.0, top_k=5, seed=3))
    assert s1 == s2


def test_meta_init_is_deterministic():
    cfg = GPTConfig(sequence_len=16, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    states = []
    for _ in range(2):
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device="cpu")
        torch.manual_seed(7)
        model.init_weights()
        states.append(model.state_dict())
        assert torch.isfinite(model.cos).all() and model.cos.shape == (1, 160, 1, 8)
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)
    assert "cos" not in states[0]  # rotary tables are not checkpointed


def test_overfits_fixed_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    model.init_weights()
    optimizers = model.setup_optimizers()
    assert all("initial_lr" in g for opt in optimizers for g in opt.param_groups)
    x = tokens(4, 33)
    losses = []
    for _ in range(50):
        loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 3.5  # ~ln(64) = 4.16 at init
    assert losses[-1] < 0.2 * losses[0]


def test_setup_optimizers_extra_params():
    model = make_model()
    extra_w = torch.nn.Parameter(torch.randn(8, 16))
    extra_b = torch.nn.Parameter(torch.zeros(8))
    adamw, muon = model.setup_optimizers(extra_matrix_params=[extra_w],
                                         extra_adam_params=[{"params": [extra_b], "lr": 1e-3}])
    assert any(p is extra_w for g in muon.param_groups for p in g["params"])
    assert any(p is extra_b and g["lr"] == 1e-3 for g in adamw.param_groups for p in g["params"])
    with pytest.raises(ValueError, match="2D"):
        model.setup_optimizers(extra_matrix_params=[extra_b])


def test_estimate_flops_scales_with_depth():
    small = make_model(n_layer=2).estimate_flops()
    big = make_model(n_layer=4).estimate_flops()
    assert 0 < small < big
    model = make_model(n_layer=2)
    n = model.num_params() - model.transformer.wte.weight.numel()
    assert small == 6 * n + 12 * 2 * 4 * 8 * 32
