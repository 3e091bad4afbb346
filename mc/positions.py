"""
Rotary (RoPE) tables for working-context entries: (position, span length) -> (cos, sin) [R, L, 1, hd/2].

Convention (identical to nanochat/gpt.py's rotary_cos_sin, so a raw token gets bit-for-bit the
table the GPT builds for itself): channel pair i rotates at inv_freq_i = base^(-2i/hd), base 10000,
angle = position * inv_freq_i, computed in float32. With the GPT's rope_fraction < 1 the slowest pairs
have inv_freq 0 (nanochat/gpt.py rope_inv_freq): every entry, raw or gist, leaves them unrotated, and the
Gaussian damping below is exp(0) = 1 there, so gists keep the same content-only channels as tokens.

positional_type:
- "simple":   every entry at one position (mc/working_context.py puts a gist at the last token of its
              span, s + n - 1, which measured better than the block centre). cos/sin as for a token.
- "gaussian": Gaussian RoPE. A gist stands for n tokens at positions s..s+n-1. Averaging the rotation
              e^{i w p} over those positions gives the expected rotation
                  E[e^{i w p}] = e^{i w mu} * E[e^{i w d}],   d = p - mu,
              and modelling d as Gaussian with the variance of a discrete uniform over n positions,
                  sigma^2 = (n^2 - 1) / 12     (0 for a raw token; ~ n / sqrt(12) squared for large n),
              gives E[e^{i w d}] = exp(-(w sigma)^2 / 2). So each frequency's cos and sin are scaled by
                  a_i = exp(-0.5 * (inv_freq_i * sigma)^2):
              slow pairs (w sigma << 1) are untouched and still carry the entry's coarse position; fast
              pairs, whose angle would wrap around many times inside the span (aliasing: they cannot say
              where in the span the content was), are damped towards 0. The exact uniform average is a
              Dirichlet kernel sin(n w/2) / (n sin(w/2)), which matches the Gaussian to second order in w
              but oscillates and changes sign at high frequency; the Gaussian damps monotonically.
              The Gaussian is centred on the entry's position (mu = the last token by default, a shift of
              (n-1)/2 from the exact centre, kept for consistency with "simple"; pass
              entry_positions(..., anchor="center") gives that expectation; the pipeline
              (wc_cos_sin) always uses the last token, which measured better, see DESIGN.md).
              Note: the GPT applies QK-norm after the rotation, which rescales each rotated q/k vector
              back to unit RMS; the damping then acts as a relative reweighting of fast vs slow pairs
              (the gist's attention is driven by its coarse position), not as an absolute shrink.
              For raw tokens (n = 1) gaussian == simple exactly.
"""

import torch

from nanochat.gpt import rope_inv_freq


def entry_positions(span_start: torch.Tensor, span_len: torch.Tensor, anchor: str = "last") -> torch.Tensor:
    """float positions of entries: 'last' = s + n - 1 (the default everywhere), 'center' = s + (n - 1) / 2."""
    if anchor == "last":
        return (span_start + span_len - 1).float()
    if anchor == "center":
        return span_start.float() + (span_len.float() - 1) / 2
    raise ValueError(f"anchor must be 'last' or 'center', got {anchor!r}")


def rope_cos_sin(positions: torch.Tensor, head_dim: int, span_len: torch.Tensor | None = None,
                 positional_type: str = "simple", base: float = 10000.0, dtype=torch.float32,
                 rope_fraction: float = 1.0):
    """positions [..., L] (float or int) and span_len [..., L] -> (cos, sin) each [..., L, 1, head_dim/2].

    span_len is needed for "gaussian" (padding entries may have span_len 0: treated as 1)."""
    if positional_type not in ("simple", "gaussian"):
        raise ValueError(f"--positional_type={positional_type!r} is not one of simple, gaussian")
    inv_freq = rope_inv_freq(head_dim, base, rope_fraction, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., L, hd/2]
    cos, sin = angles.cos(), angles.sin()
    if positional_type == "gaussian":
        if span_len is None:
            raise ValueError("gaussian positions need span_len")
        n = span_len.to(torch.float32).clamp(min=1.0)
        sigma = ((n * n - 1.0) / 12.0).sqrt()  # std of a discrete uniform over n consecutive positions
        damp = torch.exp(-0.5 * (sigma[..., None] * inv_freq) ** 2)
        cos, sin = cos * damp, sin * damp
    return cos[..., None, :].to(dtype), sin[..., None, :].to(dtype)


def wc_cos_sin(wc, head_dim: int, positional_type: str = "simple", base: float = 10000.0, dtype=torch.float32,
               rope_fraction: float = 1.0):
    """(cos, sin) [R, L, 1, head_dim/2] for a WorkingContext, ready for GPT.forward(cos_sin_override=...)."""
    return rope_cos_sin(wc.positions, head_dim, wc.span_len, positional_type, base, dtype, rope_fraction)
