"""
Validation loss in bits per byte (bpb): a loss that does not depend on the tokenizer.

Why not the mean token loss? Cross-entropy per token depends on how much text a token holds: a tokenizer
with bigger tokens has fewer, harder predictions. Normalizing by the bytes of text predicted makes models
with different vocabularies comparable.

The math. For every predicted target token t (targets == -1 are ignored) the model gives
    loss_t = -ln p(t | context)                    (nats, from loss_reduction='none')
and the tokenizer says how many UTF-8 bytes the token spells, bytes_t = token_bytes[t]. Special tokens
(<|bos|> ...) spell no text (bytes_t = 0); their loss is left out, because no byte "pays" for it. Then
    total_nats  = Σ_t loss_t · [bytes_t > 0]
    total_bytes = Σ_t bytes_t
    bpb = total_nats / (ln 2 · total_bytes)        (ln 2 converts nats to bits)
Under torch.distributed both sums are all-reduced first, so every rank returns the same global number
(a ratio of global sums, not a mean of per-rank ratios).
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte over `steps` batches. `batches`: an iterator of (x, y) [B,T] long tensors (or an object
    with .next_batch(), like DistributedTokenLoader); `token_bytes`: [V] int64 bytes per token id."""
    if steps <= 0:
        raise ValueError(f"evaluate_bpb needs steps >= 1, got {steps}")
    next_batch = batches.next_batch if hasattr(batches, "next_batch") else lambda: next(batches)
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next_batch()
        loss = model(x, y, loss_reduction="none").reshape(-1)  # [B*T] nats, 0 where y == -1
        y = y.reshape(-1).to(device)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = nbytes > 0
        total_nats += (loss.to(device).double() * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    if total_bytes.item() == 0:
        raise ValueError("evaluate_bpb saw no text bytes (every target was ignored or a special token); "
                         "check the batches and token_bytes")
    return total_nats.item() / (math.log(2) * total_bytes.item())
