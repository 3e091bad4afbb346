"""
Muon: momentum + orthogonalized updates for 2D weight matrices, plus its distributed variant.

Why: for a matrix W the gradient G = U S V^T is usually dominated by a few directions (a few large
singular values). SGD/Adam-style steps therefore mostly push along those. Muon replaces the update by
its "orthogonal part" U V^T (every singular value set to 1): the same directions, but all of them
moved by the same amount, which lets rare-but-useful directions learn as fast as dominant ones.

How: computing U V^T by SVD is slow, so Muon runs a few Newton-Schulz iterations, i.e. an odd matrix
polynomial X <- a X + b (X X^T) X + c (X X^T)^2 X. On singular values this is the scalar map
s <- a s + b s^3 + c s^5. Starting from X = G / ||G||_F (all s in (0, 1]), repeated application
drives every s toward ~1. The coefficients (3.4445, -4.7750, 2.0315) make the slope at 0 large (a =
3.4445), so tiny singular values grow fast; the price is that they do not converge to exactly 1 but
oscillate in a band of roughly [0.7, 1.2] — which is fine for an optimizer step. 5 iterations suffice.
It runs in bfloat16 on GPU (fast, stable because the polynomial is bounded on that band) and float32
on CPU.

Step for each matrix W with gradient G (momentum mu, learning rate lr):
    buf = mu * buf + (1 - mu) * G                  (momentum, an EMA of gradients)
    U   = (1 - mu) * G + mu * buf   (nesterov)     or   U = buf
    O   = NewtonSchulz5(U)                         (~ orthogonal, spectral norm ~1)
    W  -= lr * max(1, rows/cols) ** 0.5 * O
Shape scaling: O has min(rows, cols) singular values ~1, so its entries have RMS ~ 1/sqrt(max(rows,
cols)). Multiplying by sqrt(max(1, rows/cols)) makes the entry RMS 1/sqrt(cols) = 1/sqrt(fan_in) for
every shape (nn.Linear weights are [out, in]), matching how the weights were initialized.

DistMuon: averages gradients over ranks (all_reduce, works on gloo), then each rank orthogonalizes only
the matrices it owns (round-robin by index: matrix i belongs to rank i % world_size, which also holds
its momentum buffer), then every matrix is broadcast from its owner. The result is identical to
single-process Muon on the averaged gradients, with the Newton-Schulz work split across ranks.
"""

import torch
import torch.distributed as dist

from nanochat.adamw import average_gradients

NS_COEFFS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def zeropower_via_newtonschulz5(G, steps=5):
    """Approximately U V^T for G = U S V^T (2D), by the quintic Newton-Schulz iteration above."""
    if G.ndim != 2:
        raise ValueError(f"Newton-Schulz expects a 2D matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(0) > X.size(1)
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller (rows x rows) Gram matrix
        X = X.T
    X = X / (X.norm() + 1e-7)  # Frobenius norm >= spectral norm, so all singular values are now <= 1
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X  # = a X + b (X X^T) X + c (X X^T)^2 X
    if transposed:
        X = X.T
    return X


class Muon(torch.optim.Optimizer):
    """Muon for 2D parameters only (use AdamW for embeddings, the head, and any vectors)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles 2D matrices, got a parameter of shape {tuple(p.shape)}; "
                                     "optimize it with AdamW instead")

    def _update(self, p, group):
        """Apply one Muon step to parameter p (its grad must be set)."""
        g = p.grad
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        mu = group["momentum"]
        buf.lerp_(g, 1 - mu)  # buf = mu * buf + (1 - mu) * g
        u = g.lerp(buf, mu) if group["nesterov"] else buf  # nesterov: (1 - mu) * g + mu * buf
        o = zeropower_via_newtonschulz5(u, steps=group["ns_steps"])
        scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
        p.add_(o.to(p.dtype), alpha=-group["lr"] * scale)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon does not support a closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)


class DistMuon(Muon):
    """Muon under torch.distributed (any backend): average grads, owner updates, broadcast.

    average_grads=False: gradients were already averaged by the caller (see DistAdamW)."""

    def __init__(self, params, average_grads=True, **kwargs):
        super().__init__(params, **kwargs)
        self.average_grads = average_grads

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("DistMuon does not support a closure")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        entries = [(p, group) for group in self.param_groups for p in group["params"]]
        if self.average_grads:
            average_gradients(p for p, _ in entries)  # grad None everywhere -> stays None (skipped)
        handles = []
        for i, (p, group) in enumerate(entries):
            if p.grad is None:
                continue  # same on every rank after average_gradients
            owner = i % world_size
            if owner == rank:
                self._update(p, group)
            handles.append(dist.broadcast(p.data, src=owner, async_op=True))
        for h in handles:
            h.wait()
