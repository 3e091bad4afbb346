"""
Training memory of a GPU run, estimated on any machine: a CPU dry run, no accelerator needed.

The model is built on PyTorch's meta device (shapes and dtypes, no data), one training forward runs
there, and every tensor that autograd keeps for the backward is counted once, by storage. The peak of
a training step (the start of the backward, with every activation still saved) is then

    weights + grads + optimizer state + saved activations + backward working set + allowance

- weights and grads: float32, as trained (autocast's bf16 copies of the weights are saved tensors,
  so they land in the activations);
- optimizer state: AdamW keeps two float32 tensors per parameter (exp_avg, exp_avg_sq), Muon one
  (its momentum), read off the optimizers the model itself sets up;
- saved activations: the GPU's numerics are emulated (`GPUNumerics`): matmul inputs cast to bf16
  as CUDA autocast does (a weight's cast cached, as autocast caches it), and attention saving what the
  flash / memory-efficient kernels save (q, k, v, the output, one float32 log-sum-exp per query row,
  and an additive mask when there is one) instead of the T×T probabilities of the meta/CPU math path;
- backward working set: 2 × the largest saved tensor (the loss head: the gradient of the float32
  logits is made while the softmax output is still alive, and tanh's backward makes one more);
- allowance: 1 GiB for the CUDA context and the allocator's slack, plus 10% of the activations.

Not modelled: torch.compile's fusions (they save less, so the estimate errs high), fragmentation past
the allowance, multi-GPU buffers. dev/gpu_check.py prints the estimate beside the measured peak, which
is how the model gets checked on a GPU. scripts/memory_plan.py is the CLI (run10.sh's presets call it).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

GIB = 2**30
CONTEXT_BYTES = 1 * GIB  # CUDA context + allocator slack
ACTIVATION_SLACK = 0.10  # fragmentation of the activation pool

# the ops CUDA autocast runs in bf16 (its "lower precision" list, the ones the models here call)
_BF16_OPS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm,
             torch.einsum, torch.addmm, torch.baddbmm}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int
    activations: int
    working_set: int  # the backward's transient tensors
    allowance: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.working_set + self.allowance

    def lines(self) -> list[str]:
        parts = [("weights (fp32)", self.weights), ("grads (fp32)", self.grads), ("optimizer state", self.optimizer),
                 ("saved activations", self.activations), ("backward working set", self.working_set),
                 ("context + allocator", self.allowance)]
        return [f"  {name:<22} {n / GIB:7.2f} GiB" for name, n in parts] + [f"  {'total':<22} {self.total / GIB:7.2f} GiB"]


class _FlashLikeAttention(torch.autograd.Function):
    """Saves what the fused GPU attention kernels save; the forward only makes shapes (meta device)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.size(-1))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the memory dry run only measures the forward; it never runs a backward")


class GPUNumerics(TorchFunctionMode):
    """Run a forward on the meta device with the tensors a CUDA bf16-autocast step would make (see above).
    autocast=False keeps float32 matmuls: the numerics of a CPU step (whose attention kernel saves the
    same as the GPU's), which is how the estimate is checked against a real run without a GPU."""

    def __init__(self, autocast: bool = True):
        super().__init__()
        self.autocast = autocast
        self._casts = {}  # id(weight) -> its bf16 copy, made once per forward like autocast's cache

    def _bf16(self, t):
        if not (self.autocast and isinstance(t, torch.Tensor) and t.dtype == torch.float32):
            return t
        if t.is_leaf and t.requires_grad:
            if id(t) not in self._casts:
                self._casts[id(t)] = (t, t.to(torch.bfloat16))  # t kept so its id stays unique
            return self._casts[id(t)][1]
        return t.to(torch.bfloat16)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (self._bf16(t) for t in args[:3])
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if mask is not None:  # the fused kernels take the mask as an additive bias in q's dtype
                mask = mask.to(q.dtype)
            return _FlashLikeAttention.apply(q, k, v, mask)
        if func in _BF16_OPS:
            args = tuple(self._bf16(a) if isinstance(a, torch.Tensor) else a for a in args)
        return func(*args, **kwargs)


def saved_activation_bytes(forward, exclude=(), autocast: bool = True) -> tuple[int, int]:
    """(total bytes, largest single storage) that autograd saves while `forward()` runs under GPUNumerics;
    storages of the tensors in `exclude` (the parameters, counted separately) are left out."""
    excluded = {t.untyped_storage()._cdata for t in exclude}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in excluded:
            saved[storage._cdata] = (storage, storage.nbytes())  # the storage held: its id stays unique
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), GPUNumerics(autocast):
        out = forward()
    del out
    sizes = [n for _, n in saved.values()]
    return sum(sizes), max(sizes, default=0)


def optimizer_state_bytes(optimizers) -> int:
    """float32 state per parameter: AdamW 2 (exp_avg, exp_avg_sq), anything else (Muon) 1 (momentum)."""
    total = 0
    for opt in optimizers:
        per_param = 2 if isinstance(opt, torch.optim.AdamW) or "Adam" in type(opt).__name__ else 1
        total += per_param * 4 * sum(p.numel() for g in opt.param_groups for p in g["params"])
    return total


def estimate(params, optimizers, forward, autocast: bool = True) -> MemoryEstimate:
    """The peak of one training micro-step: `params` every trained tensor (meta), `optimizers` as the trainer
    builds them, `forward()` one micro-batch's forward returning the loss, on the meta device; autocast=False
    for a CPU (float32) step."""
    params = list(params)
    n = sum(p.numel() for p in params)
    activations, largest = saved_activation_bytes(forward, exclude=params, autocast=autocast)
    return MemoryEstimate(weights=4 * n, grads=4 * n, optimizer=optimizer_state_bytes(optimizers),
                          activations=activations, working_set=2 * largest,
                          allowance=CONTEXT_BYTES + math.ceil(ACTIVATION_SLACK * activations))
