"""Rotary tables for WC entries: raw tokens reproduce the GPT's own table bit for bit; Gaussian RoPE math."""

import math

import pytest
import torch

from mc.positions import entry_positions, rope_cos_sin, rope_inv_freq, wc_cos_sin
from mc.working_context import build_working_context, targets_for
from nanochat.gpt import GPT, GPTConfig, rotary_cos_sin

HD = 16


def test_simple_raw_positions_reproduce_the_gpt_table_exactly():
    model = GPT(GPTConfig(sequence_len=64, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=2 * HD))
    T = 640
    pos = torch.arange(T).expand(3, T)
    cos, sin = rope_cos_sin(pos, HD)
    assert cos.shape == (3, T, 1, HD // 2)
    assert torch.equal(cos[0], model.cos[0, :T]) and torch.equal(sin[2], model.sin[0, :T])
    gcos, gsin = rotary_cos_sin(pos.float(), HD)
    assert torch.equal(cos, gcos) and torch.equal(sin, gsin)
    # and through a working context of raw tokens
    plan = torch.zeros(2, 50, dtype=torch.int8)
    plan[1, :20] = -1
    wc = build_working_context(plan, [torch.randn(2, 50, 8)], 4)
    wcos, wsin = wc_cos_sin(wc, HD, "gaussian")
    assert torch.equal(wcos[0], model.cos[0, :50]) and torch.equal(wsin[1, 20:], model.sin[0, 20:50])


def test_gaussian_equals_simple_for_raw_tokens():
    pos = torch.randint(0, 5000, (4, 30))
    one = torch.ones_like(pos)
    for a, b in zip(rope_cos_sin(pos, HD, one, "gaussian"), rope_cos_sin(pos, HD, one, "simple")):
        assert torch.equal(a, b)


def test_gaussian_damping_formula():
    n = torch.tensor([[32, 1024]])
    pos = torch.tensor([[31, 1023]])
    cos, sin = rope_cos_sin(pos, HD, n, "gaussian")
    s_cos, s_sin = rope_cos_sin(pos, HD, n, "simple")
    inv = rope_inv_freq(HD)
    for j, span in enumerate((32, 1024)):
        sigma = math.sqrt((span * span - 1) / 12)
        damp = torch.exp(-0.5 * (inv * sigma) ** 2)
        torch.testing.assert_close(cos[0, j, 0], s_cos[0, j, 0] * damp)
        torch.testing.assert_close(sin[0, j, 0], s_sin[0, j, 0] * damp)
    amp = (cos ** 2 + sin ** 2).sqrt()[0, :, 0]
    assert amp[0, 0] < 1e-10 and amp[0, -1] > 0.99  # fastest pair gone, slowest kept (32-token gist)
    assert (amp[1] <= amp[0] + 1e-7).all()  # a wider span is damped at least as much
    assert (amp[:, 1:] >= amp[:, :-1] - 1e-7).all()  # slower pairs are damped less


def test_gaussian_is_the_expected_rotation_over_the_span_for_slow_pairs():
    """Centred anchor: mean over p in [s, s+n) of e^{i w p} ~= e^{i w mu} * exp(-(w sigma)^2 / 2)
    whenever w * sigma is small (the Gaussian matches the uniform average to second order)."""
    s, n = torch.tensor([[4096]]), torch.tensor([[32]])
    mu = entry_positions(s, n, anchor="center")
    cos, sin = rope_cos_sin(mu, HD, n, "gaussian")
    inv = rope_inv_freq(HD).double()
    p = torch.arange(4096, 4096 + 32, dtype=torch.float64)
    exact_cos = torch.cos(p[:, None] * inv).mean(0)
    exact_sin = torch.sin(p[:, None] * inv).mean(0)
    sigma = math.sqrt((32 * 32 - 1) / 12)
    slow = inv * sigma < 0.5
    assert slow.sum() >= 3
    torch.testing.assert_close(cos[0, 0, 0][slow].double(), exact_cos[slow], atol=2e-3, rtol=0)
    torch.testing.assert_close(sin[0, 0, 0][slow].double(), exact_sin[slow], atol=2e-3, rtol=0)


def test_entry_positions_and_padding():
    s, n = torch.tensor([0, 32, 64]), torch.tensor([32, 1, 0])
    assert entry_positions(s[:2], n[:2]).tolist() == [31.0, 32.0]
    assert entry_positions(s[:2], n[:2], "center").tolist() == [15.5, 32.0]
    cos, sin = rope_cos_sin(torch.tensor([3.0, 4.0, 0.0]), HD, n, "gaussian")  # span 0 = padding: finite
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()
    assert rope_cos_sin(s, HD, n, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(ValueError, match="positional_type"):
        rope_cos_sin(torch.zeros(3), HD, positional_type="alibi")
    with pytest.raises(ValueError, match="span_len"):
        rope_cos_sin(torch.zeros(3), HD, positional_type="gaussian")
    with pytest.raises(ValueError, match="even head_dim"):
        rope_cos_sin(torch.zeros(3), 15)
    with pytest.raises(ValueError, match="anchor"):
        entry_positions(torch.zeros(1), torch.ones(1), "middle")


def test_packed_raw_contexts_through_the_gpt_match_plain_forwards():
    """An all-raw WC (and a padded recency row beside it) through GPT.forward(inputs_embeds, cos_sin_override,
    key_padding_mask) gives the same per-token losses as the plain GPT on the same tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=2 * HD))
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:  # non-zero output projections so attention matters
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    T, W = 40, 24
    row = torch.randint(0, 50, (1, T + 1))
    x, y = row[:, :-1], row[:, 1:]
    plan = torch.zeros(2, T, dtype=torch.int8)
    plan[1, : T - W] = -1  # recency baseline, right-aligned behind 16 padding slots
    with torch.no_grad():
        wc = build_working_context(plan, [model.transformer.wte(x)], 4, torch.tensor([0, 0]))
        tgt = targets_for(wc, row)
        loss = model(inputs_embeds=wc.embeddings, cos_sin_override=wc_cos_sin(wc, HD, "gaussian"),
                     key_padding_mask=wc.valid, targets=tgt, loss_reduction="none")
        full = model(x, targets=y, loss_reduction="none")
        recent = model(x[:, T - W:], targets=y[:, T - W:], loss_reduction="none")
    torch.testing.assert_close(loss[0], full[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss[1, T - W:], recent[0], rtol=1e-4, atol=1e-4)  # rotary is relative
    assert (loss[1, : T - W] == 0).all()  # padding has no target
