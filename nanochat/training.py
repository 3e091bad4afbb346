"""
What every trainer shares (scripts/base_train.py, mid_train.py, chat_sft.py, chat_rl.py):

- crossed():         token cadences: has a boundary of `every` tokens been passed this step?
- lr_multiplier():   the LR schedule as a function of run progress in [0, 1]; muon_momentum(): Muon's warmup
- all_reduce_sum(), all_reduce_mean(): cross-process reductions that work on gloo too (no AVG op)
- CurveLog:          report/<stage>_curve.jsonl, the loss curves nanochat.report plots
- resume_step(), resume_problem(), complete(): what --resume means, whether a checkpoint can be continued
  by this run, and "already complete at step N, nothing to do" (the recipes re-run finished stages cheaply)
- rng_state(), restore_rng(): CPU/CUDA/Python RNG states in a checkpoint's per-rank JSON
- NonFiniteGuard, grad_norm(), clip_grads(): a NaN/inf loss or gradient stops training (or skips the step)
  with a message naming the step, the micro-batch and the loss component, and writes a debug checkpoint
"""

import json
import math
import os
import random

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import latest_step
from nanochat.common import die, print0


def grad_accum_steps_of(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step: total_batch_size / (device_batch_size x seq_len x world_size), or
    ValueError naming the flags and the nearest size that divides."""
    per = device_batch_size * seq_len * world_size
    if total_batch_size % per != 0:
        raise ValueError(f"--total_batch_size={total_batch_size} is not a multiple of device_batch_size × max_seq_len "
                         f"× world_size = {device_batch_size}×{seq_len}×{world_size} = {per}; pick sizes that divide "
                         f"(e.g. --total_batch_size={max(1, round(total_batch_size / per)) * per})")
    return total_batch_size // per


def crossed(tokens_before: int, tokens_after: int, every: int) -> bool:
    """True when a token cadence boundary lies in (tokens_before, tokens_after]; every <= 0 = never."""
    return every > 0 and tokens_after // every > tokens_before // every


def lr_multiplier(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """progress in [0, 1] -> lr multiplier: linear warmup over the first warmup_ratio of the run, flat,
    then linear down to final_lr_frac over the last warmdown_ratio."""
    if warmup_ratio > 0 and progress < warmup_ratio:
        return (progress + 1e-9) / warmup_ratio
    if warmdown_ratio <= 0 or progress <= 1 - warmdown_ratio:
        return 1.0
    frac = max(0.0, (1 - progress) / warmdown_ratio)  # 1 at the start of the warmdown, 0 at the end
    return frac + (1 - frac) * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon momentum ramps 0.85 → 0.95 over the first 300 steps: low momentum early, while the loss landscape
    changes fast (base_train)."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def all_reduce_sum(t):
    """Sum over processes in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t):
    """Mean over processes in place: sum then divide, since gloo has no AVG op."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


class CurveLog:
    """Append-only JSONL curve on rank 0. start_step > 0 (resume) keeps the old rows with step <= start_step,
    so the curve of a resumed run reads like the uninterrupted one; a fresh run starts an empty file."""

    def __init__(self, path: str, master: bool, start_step: int = 0):
        self.path, self.master = path, master
        if not master:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        kept = []
        if start_step > 0 and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(path, "w") as f:
            f.writelines(kept)

    def log(self, row: dict):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def resume_problem(meta: dict, user_config: dict, must_match, world_size: int, model_config: dict | None = None) -> str | None:
    """Why the checkpoint described by `meta` cannot be continued by this run (None = it can): a flag in
    `must_match` whose value changed (continuing would silently become a different experiment), a different
    model shape (model_config, e.g. a retrained tokenizer with another vocab), or a different process count
    (the loader and optimizer shards are per rank)."""
    saved_model = meta.get("model_config")
    if model_config is not None and saved_model is not None and saved_model != model_config:
        diffs = ", ".join(f"{k}={saved_model.get(k)!r} (now {model_config.get(k)!r})"
                          for k in sorted(set(saved_model) | set(model_config)) if saved_model.get(k) != model_config.get(k))
        return (f"its model has {diffs}. If the tokenizer was retrained, restore the old one or start a new run "
                f"(--resume='' or a new --model_tag)")
    saved = meta.get("user_config", {})
    changed = [k for k in must_match if k in saved and saved[k] != user_config.get(k)]
    if changed:
        diffs = ", ".join(f"--{k}={saved[k]!r} (now {user_config.get(k)!r})" for k in changed)
        return f"it was trained with {diffs}. Re-run with the original values, or use a new --model_tag for a new run"
    if meta.get("world_size", world_size) != world_size:
        return (f"it was written by {meta['world_size']} processes and this run has {world_size}; "
                f"resume with the same process count")
    return None


def resume_step(resume: str, checkpoint_dir: str) -> int | None:
    """--resume: '' or 'none' = fresh (None); 'auto' = the newest complete checkpoint in checkpoint_dir (None when
    there is none yet); digits = that step. Anything else is an error naming the accepted values."""
    if resume in ("", "none"):
        return None
    if resume == "auto":
        step = latest_step(checkpoint_dir)
        if step is None:
            print0(f"--resume=auto: no checkpoint in {checkpoint_dir} yet, starting fresh")
        return step
    if not resume.isdigit():
        die(f"--resume={resume!r}: use '' (fresh), 'auto' (latest checkpoint) or a step number")
    return int(resume)


def complete(prog: str, checkpoint_dir: str, step: int, final_step: int) -> bool:
    """True (after saying so) when the checkpoint being resumed is the run's final step: nothing to train, and a
    re-run recipe moves on in seconds. A checkpoint past the final step is an error (the horizon was lowered)."""
    if step > final_step:
        die(f"{checkpoint_dir} step {step} is past this run's last step {final_step}: raise --num_iterations back, "
            f"resume an earlier step with --resume=<step>, or use a new --model_tag")
    if step == final_step:
        print0(f"{prog}: already complete at step {step} ({checkpoint_dir}), nothing to do")
    return step == final_step


def rng_state(device) -> dict:
    """JSON-serializable RNG states (CPU torch, Python, and CUDA on a CUDA device) for a checkpoint's rank<r>.json."""
    version, internal, gauss = random.getstate()
    state = {"cpu_rng": torch.get_rng_state().tolist(), "py_rng": [version, list(internal), gauss]}
    if torch.device(device).type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rng(state: dict, device):
    """Undo rng_state() (keys missing in older checkpoints are left alone)."""
    torch.set_rng_state(torch.tensor(state["cpu_rng"], dtype=torch.uint8))
    if "py_rng" in state:
        version, internal, gauss = state["py_rng"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda_rng" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda_rng"], dtype=torch.uint8), device)


# --------------------------------------------------------------------------------------------------
# Numerical guard

# MC loss components among MCResult.metrics (0-d tensors), and how the guard names them
LOSS_PARTS = {"mc/lm_loss": "base LM loss (mc/lm_loss)", "mc/token_loss": "MC variant loss (mc/token_loss)",
              "mc/gist_penalty": "gist penalty (mc/gist_penalty)", "mc/lens_loss": "LensNet loss (mc/lens_loss)"}


def loss_parts(metrics: dict | None) -> dict:
    """{readable name: 0-d tensor} of the MC loss components in an MCResult's metrics (for NonFiniteGuard.watch)."""
    return {LOSS_PARTS[k]: v for k, v in (metrics or {}).items() if k in LOSS_PARTS and isinstance(v, torch.Tensor)}


def grad_norm(params) -> torch.Tensor:
    """The global L2 norm of the gradients, as clip_grad_norm_ computes it (0-d tensor, no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def clip_grads(params, max_norm: float, norm: torch.Tensor):
    """Scale the gradients so their global norm is at most max_norm (0 = off), reusing the norm already computed:
    identical to torch.nn.utils.clip_grad_norm_."""
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)


class NonFiniteGuard:
    """Never train on NaN/inf. Each trainer, per optimizer step:

        loss = guard.poison(loss, step, micro)   # testing knob only (--debug_inject_nan_step)
        guard.watch(micro, loss, parts)          # per micro-batch: device tensors kept, no host sync
        ... backward, gradient averaging ...
        if guard.check(step, params, grad_clip, save_debug):  # the ONE host sync of the step
            optimizer.step()

    check() computes the global gradient norm (the one clip_grad_norm_ computes, reused for the clip), folds
    isfinite(every watched loss) & isfinite(grad norm) into one flag, sums it over processes (a NaN
    on one rank is every rank's problem, and all must take the same branch), and reads it once. Only when it is
    False does it look closer (syncs are fine there): which micro-batch, which named loss component (`parts`,
    e.g. the MC controller's base LM / variant / lens losses), which parameters hold non-finite gradients. Then
    save_debug(step, message) writes a debug checkpoint (the state before that step; the trainers put it under
    <checkpoint_dir>/debug/, which latest_step() never looks at), and
      mode 'stop' (default): die() with the message (exit code 2);
      mode 'skip': print it, drop the step's gradients (the caller zeroes them, no optimizer step) and count it in
      .skipped; debug checkpoint for the first skip only; MAX_CONSECUTIVE_SKIPS in a row stop training anyway.
    When all is finite, check() clips the gradients to max_norm (0 = no clip) and returns True.
    """

    MAX_CONSECUTIVE_SKIPS = 10

    def __init__(self, mode: str = "stop", device="cpu", model=None, mc_modules=None, inject_step: int = -1):
        """model / mc_modules: whose parameters to name when gradients are non-finite (MC ones as "mc.*")."""
        if mode not in ("stop", "skip"):
            die(f"--nonfinite={mode!r}: use 'stop' (default: end training with a debug checkpoint) or 'skip'")
        self.mode, self.device, self.inject_step = mode, torch.device(device), inject_step
        self.named_params = [*(model.named_parameters() if model is not None else ()),
                             *((f"mc.{n}", p) for n, p in (mc_modules.named_parameters() if mc_modules is not None else ()))]
        self.skipped, self.consecutive = 0, 0
        self._seen = []  # (micro, loss, parts) of the current step

    def poison(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """Testing knob: loss × NaN in micro-batch 0 of optimizer step `inject_step` (1-based, as logged)."""
        return loss * float("nan") if step == self.inject_step and micro == 0 else loss

    def watch(self, micro: int, loss: torch.Tensor, parts: dict | None = None):
        """Remember a micro-batch's loss (checked) and its named components (only read to name the culprit)."""
        self._seen.append((micro, loss.detach(), parts or {}))

    def check(self, step: int, params, max_norm: float, save_debug=None) -> bool:
        """True = all finite (gradients now clipped): take the optimizer step. See the class docstring otherwise."""
        seen, self._seen = self._seen, []
        params = list(params)
        norm = grad_norm(params)
        flags = [torch.isfinite(loss).all() for _, loss, _ in seen] + [torch.isfinite(norm).all()]
        bad = (~torch.stack([f.to(self.device) for f in flags]).all()).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.SUM)
        if bad.item() == 0:
            self.consecutive = 0
            clip_grads(params, max_norm, norm)
            return True
        message = self.describe(step, seen, norm)
        if self.mode == "skip":
            self.skipped += 1
            self.consecutive += 1
        if save_debug is not None and (self.mode == "stop" or self.skipped == 1):
            message += f"\ndebug checkpoint (the state before step {step}; --resume never loads it): {save_debug(step, message)}"
        if self.mode == "stop":
            die(f"{message}\ntraining stopped (--nonfinite=stop): lower the learning rates or check the data (and the "
                f"--mc_* settings); --nonfinite=skip drops such steps instead")
        if self.consecutive >= self.MAX_CONSECUTIVE_SKIPS:
            die(f"{message}\n{self.consecutive} steps in a row were non-finite: training stopped even with "
                f"--nonfinite=skip; lower the learning rates or check the data")
        print0(f"{message}\nskipping step {step} (--nonfinite=skip): gradients dropped, no update; "
               f"{self.skipped} step(s) skipped so far")
        return False

    def describe(self, step: int, seen, norm) -> str:
        """The message for a non-finite step (reads values: only called on that path)."""
        bad = [(micro, loss, parts) for micro, loss, parts in seen if not torch.isfinite(loss).all()]
        lines = []
        for micro, loss, parts in bad:
            values = {name: float(v) for name, v in parts.items()}
            culprits = [f"{name} = {v}" for name, v in values.items() if not math.isfinite(v)]
            if culprits:
                what = ", ".join(culprits)
            elif values:
                what = "the total loss while its parts are finite (" + ", ".join(f"{n} = {v:.4g}" for n, v in values.items()) + ")"
            else:
                what = "the loss"
            lines.append(f"  micro-batch {micro}: {what}; loss = {float(loss)}")
        if bad:
            head = f"non-finite loss at step {step}, micro-batch {', '.join(str(m) for m, _, _ in bad)}"
        elif not torch.isfinite(norm).all():
            head = f"non-finite gradient at step {step} (grad norm {float(norm)}; every loss of this process is finite)"
        else:
            head = f"non-finite loss or gradient at step {step} on another process"
        params = [n for n, p in self.named_params if p.grad is not None and not torch.isfinite(p.grad).all()]
        if params:
            more = f" (+{len(params) - 6} more)" if len(params) > 6 else ""
            lines.append(f"  non-finite gradients in {len(params)} tensors: {', '.join(params[:6])}{more}")
        if step == self.inject_step:
            lines.append(f"  (injected on purpose by --debug_inject_nan_step={step}, a testing knob)")
        return "\n".join([head] + lines)
