"""
AdamW for nanochat, plus its distributed variant.

- Single process: GPT.setup_optimizers uses torch.optim.AdamW directly (fused on CUDA).
- DistAdamW: the model is NOT wrapped in DDP; instead this optimizer averages every gradient over
  all ranks (all_reduce SUM, then divide by world size) and then takes an ordinary AdamW step. Every
  rank ends with identical parameters and identical optimizer state, exactly what one process would
  get from the averaged gradient. Uses only all_reduce, so it works on gloo (CPU) as well as NCCL.
- average_gradients(params): that gradient averaging, shared with DistMuon.
"""

import torch
import torch.distributed as dist


@torch.no_grad()
def average_gradients(params):
    """Average .grad of `params` over all ranks in place.

    A parameter whose grad is None on every rank stays None (an optimizer skips it, as it would in
    one process); if only some ranks have a grad, the others contribute zeros. Deciding this needs one
    tiny all_reduce of "has grad" flags first, so every rank issues the same collectives in the same order.
    """
    params = list(params)
    world_size = dist.get_world_size()
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.SUM)
    handles = []
    for p, n in zip(params, has_grad.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        # SUM then divide: ReduceOp.AVG is NCCL-only, gloo lacks it
        handles.append((p.grad, dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True)))
    for grad, handle in handles:
        handle.wait()
        grad.div_(world_size)


class DistAdamW(torch.optim.AdamW):
    """AdamW on gradients averaged over all ranks (replicated optimizer state on every rank).

    average_grads=False: the caller has already averaged (a trainer that clips the *global* gradient
    norm must average before clipping), so step() skips the all_reduce instead of paying for it twice.
    """

    def __init__(self, params, average_grads=True, **kwargs):
        super().__init__(params, **kwargs)
        self.average_grads = average_grads

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("DistAdamW does not support a closure")
        if self.average_grads:
            average_gradients(p for group in self.param_groups for p in group["params"])
        return super().step()
