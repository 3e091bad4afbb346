"""The GPT's recall options: previous-token mix and partial RoPE (nanochat/gpt.py)."""

import pytest
import torch

from mc.positions import rope_cos_sin
from nanochat.gpt import GPT, GPTConfig, rope_inv_freq
from nanochat.kv_cache import KVCache


def tiny(prev_token_mix=1, rope_fraction=0.5, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=64, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                    prev_token_mix=prev_token_mix, rope_fraction=rope_fraction)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # output projections start at zero: give the blocks something to do
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    return model.eval()


def test_partial_rope_leaves_the_slowest_pairs_unrotated():
    f = rope_inv_freq(32, rope_fraction=0.5)
    assert (f[:8] > 0).all() and (f[8:] == 0).all()
    assert torch.equal(rope_inv_freq(32), rope_inv_freq(32, rope_fraction=1.0)) and (rope_inv_freq(32) > 0).all()
    # a far gist (Gaussian RoPE) is unrotated and undamped on the same pairs as a token
    cos, sin = rope_cos_sin(torch.tensor([[5000.0]]), 32, torch.tensor([[1024]]), "gaussian", rope_fraction=0.5)
    assert torch.equal(cos[..., 8:], torch.ones_like(cos[..., 8:])) and torch.equal(sin[..., 8:], torch.zeros_like(sin[..., 8:]))


def test_partial_rope_matches_content_at_any_distance():
    """With every pair unrotated, attention cannot see position: shifting all positions changes nothing."""
    model = tiny(prev_token_mix=False, rope_fraction=0.0)
    ids = torch.randint(0, 50, (1, 12))
    a = model(ids)
    pos = torch.arange(500, 512.0)[None]
    b = model(ids, cos_sin_override=rope_cos_sin(pos, model.head_dim, rope_fraction=0.0))
    torch.testing.assert_close(a, b)


def test_previous_token_mix_changes_the_model_and_is_trained_by_muon_and_adamw():
    model = tiny()
    ids = torch.randint(0, 50, (2, 10))
    plain = tiny(prev_token_mix=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prev_mix")})
    assert not torch.allclose(model(ids), plain(ids))
    adamw, muon = model.setup_optimizers()
    assert any(p is model.prev_mix.weight for g in muon.param_groups for p in g["params"])
    assert any(p is model.prev_mix_lambda for g in adamw.param_groups for p in g["params"])
    w = model.prev_mix.weight
    torch.testing.assert_close(w @ w.T, torch.eye(32), atol=1e-5, rtol=0)  # orthogonal init


@pytest.mark.parametrize("k", [1, 3])
def test_decoding_with_the_cache_equals_the_full_forward(k):
    model = tiny(prev_token_mix=k)
    ids = torch.randint(0, 50, (2, 16))
    full = model(ids)
    cache = KVCache(2, 1, 4, 16, 2)  # small on purpose: the cache grows
    steps = [model(ids[:, :9], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    cache.set_pos(5)  # a re-prefill from position 5 reads the inputs before it from the cache
    torch.testing.assert_close(model(ids[:, 5:], kv_cache=cache), full[:, 5:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_left_padding_does_not_leak_into_the_first_real_token(k):
    model = tiny(prev_token_mix=k)
    ids = torch.randint(0, 50, (1, 8))
    alone = model(ids)
    padded = torch.cat([torch.randint(0, 50, (1, 3)), ids], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 8])
    pos = torch.cat([torch.zeros(3), torch.arange(8.0)])[None]
    out = model(padded, key_padding_mask=mask, cos_sin_override=rope_cos_sin(pos, model.head_dim, rope_fraction=0.5))
    torch.testing.assert_close(out[:, 3:], alone, atol=1e-5, rtol=1e-4)


def test_two_token_mix_sees_the_token_two_back():
    """With k = 2 the input at t carries x[t-2]: changing only token 0 changes the output at position 2."""
    model = tiny(prev_token_mix=2, rope_fraction=0.5)
    with torch.no_grad():
        for block in model.transformer.h:  # no attention: any change at 2 must come through the mix
            block.attn.c_proj.weight.zero_()
    a = torch.tensor([[1, 2, 3, 4]])
    b = torch.tensor([[5, 2, 3, 4]])
    assert not torch.allclose(model(a)[0, 2], model(b)[0, 2])
    torch.testing.assert_close(model(a)[0, 3], model(b)[0, 3])


def test_query_gain_sharpens_attention_and_is_trained_by_adamw():
    torch.manual_seed(0)
    cfg = dict(sequence_len=64, vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(GPTConfig(**cfg, query_gain=4.0))
    model.init_weights()
    assert torch.equal(model.transformer.h[0].attn.q_gain, torch.full((2, 1), 4.0))
    adamw, muon = model.setup_optimizers()
    gain = model.transformer.h[0].attn.q_gain
    assert any(p is gain for g in adamw.param_groups for p in g["params"])
    assert not any(p is gain for g in muon.param_groups for p in g["params"])
    plain = GPT(GPTConfig(**cfg))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "q_gain" not in k})
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight.normal_()
        plain.transformer.h[0].attn.c_proj.weight.copy_(model.transformer.h[0].attn.c_proj.weight)
    ids = torch.randint(0, 50, (1, 10))
    assert not torch.allclose(model(ids), plain(ids))
    with torch.no_grad():
        gain.fill_(1.0)
    torch.testing.assert_close(model(ids), plain(ids))  # gain 1 = upstream attention


@pytest.mark.parametrize("bad", [dict(rope_fraction=1.5), dict(prev_token_mix=-1), dict(query_gain=-2.0)])
def test_out_of_range_options_name_the_flag(bad):
    with pytest.raises(ValueError, match="--" + next(iter(bad))):
        GPTConfig(**bad)
