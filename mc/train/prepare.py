"""
The part of an MC training step that no weight changes, and the worker that builds it ahead (--mc_async).

    prepared = controller.prepare(x, y, step, row_ids)        # in line, or:
    worker = PrepareWorker(controller); worker.submit(key, x, y, step, row_ids)   # ... the GPT runs ...
    result = controller.process_batch(x, y, step, row_ids, prepared=worker.take(key, x))

Prepared holds the variants' plans, the working contexts' layout (which entry sits in which slot:
mc.working_context.wc_layout), the targets and the rotary tables of one micro-batch. MCController.process_batch
builds it in line when it is not given. With --mc_async the trainer (MCTrainStep.prefetch) submits micro-batch
k+1 to a worker thread right after micro-batch k's forward, so it is built while the GPT runs k's backward
(on CUDA on a side stream, which first waits for the main stream's work queued at submission: the batch's copy
to the device and its row ids).
What is left in the step is the tree (GistNet, with gradients) and one gather of the entries' embeddings.

Why the result is the same with and without --mc_async: Prepared is a function of (x, y, step, row ids) and of
the committed N_t (mc/train/variant_budget.py; the trainer submits the next optimizer step's first micro-batch
after the commit), computed by the same code in either thread, and the work is integer index arithmetic and
elementwise cos/sin (no reduction whose order could depend on the thread). LensNet-proposed variants
(--mc_priority_variants) need LensNet's scores of the step's tree, so with them only the keys are prepared and
the plans are drawn in process_batch.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import torch


@dataclass
class Prepared:
    step: int
    W: int  # the step's working-context budget W_t
    N: int  # compressed variants per sample N_t
    L: int  # slots per packed row
    row_ids: torch.Tensor  # long [B]
    keys: torch.Tensor  # float [B * N, units]: the variants' random keys (mc.train.variants.hashed_uniform)
    plans: object = None  # VariantPlans, None when LensNet proposes variants (drawn in process_batch)
    wc: object = None  # WorkingContext without embeddings (mc.working_context.wc_layout), with plans
    flat: torch.Tensor | None = None  # long [R, L]: each entry's row in the levels concatenated flat
    targets: torch.Tensor | None = None  # long [R, L]
    cos: torch.Tensor | None = None  # [R, L, 1, hd/2] in the GPT's dtype
    sin: torch.Tensor | None = None
    event: object = None  # torch.cuda.Event recorded on the side stream (CUDA only)

    def tensors(self):
        """Every tensor held, the layout's included."""
        out = [getattr(self, f.name) for f in fields(self)]
        if self.plans is not None:
            out += [getattr(self.plans, f.name) for f in fields(self.plans)]
        if self.wc is not None:
            out += [getattr(self.wc, f.name) for f in fields(self.wc)]
        return [t for t in out if isinstance(t, torch.Tensor)]

    def ready(self):
        """On CUDA: make the current stream wait for the side stream's work, and keep the memory the side
        stream allocated from being reused before the current stream is done with it."""
        if self.event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(self.event)
            for t in self.tensors():
                if t.is_cuda:
                    t.record_stream(stream)
            self.event = None
        return self


class PrepareWorker:
    """One worker thread that builds the next micro-batch's Prepared while the trainer runs the current one."""

    def __init__(self, controller):
        self.controller = controller
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mc-prepare")
        self.stream = None
        self.pending = None  # (key, x, future)

    def submit(self, key, x, y, step: int, row_ids: torch.Tensor):
        """Start building micro-batch `key`'s Prepared (key: any value the trainer takes it back with)."""
        after = None
        if x.is_cuda:  # the side stream starts after what the main stream has queued NOW (the batch, its row ids),
            if self.stream is None:  # not after the backward queued next, or nothing would overlap
                self.stream = torch.cuda.Stream(device=x.device)
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(x.device))
        self.pending = (key, x, self.pool.submit(self.controller.prepare, x, y, step, row_ids, stream=self.stream,
                                                 after=after))

    def take(self, key, x):
        """The Prepared submitted for this micro-batch (same key, same x tensor), or None: built in line then."""
        if self.pending is None:
            return None
        p_key, p_x, future = self.pending
        self.pending = None
        prepared = future.result()  # re-raises the worker's exception here, in the trainer's thread
        return prepared if p_key == key and p_x is x else None

    def close(self):
        self.pool.shutdown(wait=True)
