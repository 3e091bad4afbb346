"""
Loss of a base checkpoint in bits per byte on the train and val splits, plus a few greedy samples.

    python -m scripts.base_loss                                    # latest base model, its training data
    python -m scripts.base_loss --model_tag=d4 --step=200 --split_tokens=262144
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss  # rows split over ranks, sums all-reduced

Each split is read from its start with nanochat.dataloader.DistributedTokenLoader (the val split never
overlaps train), for --split_tokens tokens in total (all ranks together), and scored with
nanochat.loss_eval.evaluate_bpb. --source/--data_dir default to what the checkpoint was trained on.
Results go to the console and to the report section "Base model loss".
"""

import argparse
import os

import torch

from nanochat import cli_checks as ck
from nanochat.checkpoint_manager import SOURCE_DIRS, CheckpointError, find_last_model_tag, load_model
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, die, get_base_dir, print0
from nanochat.dataloader import DistributedTokenLoader
from nanochat.dataset import SOURCES, resolve_source, sized_for
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "The passkey for the blue vault is",
]


def build_parser():
    p = argparse.ArgumentParser(description="Train/val bits-per-byte of a base checkpoint.", allow_abbrev=False)
    p.add_argument("--model_tag", type=ck.model_tag, default=None,
                   help="base_checkpoints/<tag> (default: most recently written)")
    p.add_argument("--step", type=ck.nonneg_int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--source", default="", choices=("", *SOURCES),
                   help="text source (default: the one the checkpoint was trained on)")
    p.add_argument("--data_dir", default="", help="folder for --source=dir/fineweb (default: the checkpoint's)")
    p.add_argument("--device_batch_size", type=ck.positive_int, default=32, help="rows per forward per process")
    p.add_argument("--split_tokens", type=ck.positive_int, default=20 * 524288,
                   help="tokens evaluated per split (all ranks)")
    p.add_argument("--max_new_tokens", type=ck.nonneg_int, default=16, help="tokens per greedy sample (0 = no samples)")
    p.add_argument("--device_type", default="", help="cuda|cpu|mps (empty = autodetect)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    try:
        model_tag = args.model_tag or find_last_model_tag(os.path.join(get_base_dir(), SOURCE_DIRS["base"]))
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag, step=args.step)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        die(str(e))
    trained = meta.get("user_config", {})
    source_kind = args.source or trained.get("source") or "synthetic"
    data_dir = args.data_dir or trained.get("data_dir") or None
    try:
        source = resolve_source(source_kind, data_dir)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
    B, T = args.device_batch_size, model.config.sequence_len
    source = sized_for(source, T)
    tokens_per_step = B * T * world_size
    steps = args.split_tokens // tokens_per_step
    if steps < 1:
        die(f"--split_tokens={args.split_tokens} is less than one batch (device_batch_size × sequence_len × world_size "
            f"= {B}×{T}×{world_size} = {tokens_per_step}); raise it or lower --device_batch_size")
    token_bytes = get_token_bytes(device=device)

    # ---------------------------------------------------------------------------------------------
    # bpb per split
    bpb = {}
    for split in ("train", "val"):
        loader = DistributedTokenLoader(tokenizer, B, T, split, source, rank=rank, world_size=world_size, device=device)
        with autocast_ctx(device.type):
            bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {bpb[split]:.4f}  ({steps * tokens_per_step:,} tokens)")

    # ---------------------------------------------------------------------------------------------
    # greedy samples (rank 0 only)
    samples = []
    if rank == 0 and args.max_new_tokens > 0:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            with torch.no_grad(), autocast_ctx(device.type):
                out = list(model.generate(ids, max_tokens=args.max_new_tokens, temperature=0))
            text = prompt + tokenizer.decode(out)
            samples.append(text)
            print0(f"sample: {text!r}")

    get_report().log(section="Base model loss", data=[
        {"model_tag": model_tag, "step": meta.get("_checkpoint", {}).get("step"),
         "source": source.kind, "split tokens": steps * tokens_per_step, "train bpb": bpb["train"], "val bpb": bpb["val"]},
        "Greedy samples:\n\n" + "\n".join(f"    {s!r}" for s in samples) if samples else "",
    ])
    compute_cleanup()


if __name__ == "__main__":
    main()
