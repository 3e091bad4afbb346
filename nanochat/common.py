"""
Shared plumbing for every script: where artifacts live, distributed setup, device and dtype
choices, logging helpers, and the W&B stand-in.

- get_base_dir():      $NANOCHAT_BASE_DIR, default ~/.cache/nanochat (created on first use)
- compute_init():      reads torchrun's env, starts the process group (NCCL on GPU, gloo on CPU),
                       seeds torch, returns (ddp, rank, local_rank, world_size, device)
- autocast_ctx():      bf16 autocast on CUDA, a no-op elsewhere (CPU runs stay fp32)
- print0():            print on rank 0 only
- str2bool():          argparse type for 0/1/true/false flags
- DummyWandb:          what `--run dummy` logs to
"""

import argparse
import contextlib
import os
import random
import sys

import torch
import torch.distributed as dist


def get_base_dir() -> str:
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from torchrun's environment variables."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_rank0() -> bool:
    return get_dist_info()[1] == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def compute_init(device_type: str = "", seed: int = 42):
    """Set up device and (under torchrun) the process group. Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device type {device_type!r}; use cuda, mps or cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device_type=cuda was requested but CUDA is not available; use --device_type=cpu")
    seed_everything(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp:
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            device = torch.device(device_type)
            dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def autocast_ctx(device_type: str):
    """bf16 autocast on GPU (the speed path); CPU stays fp32 so tests are exact and reproducible."""
    if device_type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device_type: str):
    if device_type == "cuda":
        torch.cuda.synchronize()


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (0/1/true/false), got {value!r}")


def die(message: str, code: int = 2):
    """One clear error line, then exit. For bad input that the user can fix."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class DummyWandb:
    """Stands in for a wandb run when logging is off (`--run dummy`)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run_name: str, project: str, config: dict, master_process: bool):
    """W&B run, or DummyWandb when run_name is 'dummy' or this is not rank 0.
    With no network, set WANDB_MODE=offline: wandb writes locally and `wandb sync` uploads later."""
    if run_name == "dummy" or not master_process:
        return DummyWandb()
    # wandb is optional: a --run dummy run never imports it
    import wandb

    return wandb.init(project=project, name=run_name, config=config)


def parse_token_count(value) -> int:
    """argparse type for token counts: '131072', '64K', '2M', '1.5B', optionally followed by 'tok' ('4Mtok', the
    spelling that marks a cadence as tokens, nanochat/cadence.py); -1 disables."""
    v = str(value).strip().upper().replace("_", "").removesuffix("TOK")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(v[-1:], 1)
    if scale != 1:
        v = v[:-1]
    try:
        n = float(v) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 524288, 64K, 2M or -1, got {value!r}") from None
    if n != int(n):
        raise argparse.ArgumentTypeError(f"token count must be a whole number, got {value!r}")
    return int(n)


# Dense bf16 tensor-core peak per GPU, for MFU. Vendor datasheet figures without sparsity.
_PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12),
    ("5090", 209.5e12), ("4090", 165.2e12), ("3090", 71e12),
]


def get_peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of this device, or None when unknown (CPU, unlisted GPU): MFU is then not reported."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None
