"""
What every trainer shares (scripts/base_train.py, mid_train.py, chat_sft.py, chat_rl.py):

- crossed():         token cadences: has a boundary of `every` tokens been passed this step?
- lr_multiplier():   the LR schedule as a function of run progress in [0, 1]
- all_reduce_sum(), all_reduce_mean(): cross-process reductions that work on gloo too (no AVG op)
- CurveLog:          report/<stage>_curve.jsonl, the loss curves nanochat.report plots
"""

import json
import os

import torch.distributed as dist


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


def resume_problem(meta: dict, user_config: dict, must_match, world_size: int) -> str | None:
    """Why the checkpoint described by `meta` cannot be continued by this run (None = it can): a flag in
    `must_match` whose value changed (continuing would silently become a different experiment), or a
    different process count (the loader and optimizer shards are per rank)."""
    saved = meta.get("user_config", {})
    changed = [k for k in must_match if k in saved and saved[k] != user_config.get(k)]
    if changed:
        diffs = ", ".join(f"--{k}={saved[k]!r} (now {user_config.get(k)!r})" for k in changed)
        return f"it was trained with {diffs}. Re-run with the original values, or use a new --model_tag for a new run"
    if meta.get("world_size", world_size) != world_size:
        return (f"it was written by {meta['world_size']} processes and this run has {world_size}; "
                f"resume with the same process count")
    return None
