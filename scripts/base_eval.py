"""
CORE evaluation of a base checkpoint (see nanochat/core_eval.py for the tasks and the scoring).

    python -m scripts.base_eval                                  # latest base model, synthetic bundle (offline)
    python -m scripts.base_eval --bundle=official --max_per_task=500
    python -m scripts.base_eval --bundle=/path/to/bundle_dir --model_tag=d20 --step=21400
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval   # examples split over ranks

--bundle:
  synthetic  (default) built offline from the synthetic corpus's validation documents, sized to the
             model's context: fact-recall multiple choice, fact-swap schema, exact-completion LM tasks.
  official   the DCLM-derived 22-task bundle, downloaded once to $NANOCHAT_BASE_DIR/eval_bundle
             (needs the network; offline it stops with a clear error).
  <path>     any bundle directory (core.json, or core.yaml + eval_meta_data.csv + eval_data/).
Output: a table on the console, a CSV in $NANOCHAT_BASE_DIR/base_eval/, the report section
"Base model evaluation" (with "CORE metric", which the report summary picks up).
"""

import argparse
import csv
import os
import time

from nanochat import cli_checks as ck
from nanochat.checkpoint_manager import SOURCE_DIRS, CheckpointError, find_last_model_tag, load_model
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, die, get_base_dir, print0
from nanochat.core_eval import evaluate_core_bundle
from nanochat.report import get_report


def build_parser():
    p = argparse.ArgumentParser(description="CORE metric of a base checkpoint.", allow_abbrev=False)
    p.add_argument("--model_tag", type=ck.model_tag, default=None,
                   help="base_checkpoints/<tag> (default: most recently written)")
    p.add_argument("--step", type=ck.nonneg_int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--max_per_task", type=ck.positive_int_or_off, default=-1, help="examples per task (-1 = all)")
    p.add_argument("--bundle", default="synthetic", help="synthetic | official | path to a bundle directory")
    p.add_argument("--device_type", default="", help="cuda|cpu|mps (empty = autodetect)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_per_task == 0 or args.max_per_task < -1:
        die(f"--max_per_task must be a positive count or -1 (all), got {args.max_per_task}")
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    base_dir = get_base_dir()
    try:
        model_tag = args.model_tag or find_last_model_tag(os.path.join(base_dir, SOURCE_DIRS["base"]))
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag, step=args.step)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        die(str(e))
    step = meta["_checkpoint"]["step"]

    t0 = time.time()
    try:
        with autocast_ctx(device.type):
            out = evaluate_core_bundle(model, tokenizer, device, bundle=args.bundle, max_per_task=args.max_per_task,
                                       log=print0)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        die(str(e))
    elapsed = time.time() - t0

    # ---------------------------------------------------------------------------------------------
    # table, CSV, report
    labels = list(out["results"])
    print0(f"\n{'task':<32} {'n':>6} {'accuracy':>9} {'baseline':>9} {'centered':>9}")
    for label in labels:
        print0(f"{label:<32} {out['counts'][label]:>6} {out['results'][label]:>9.4f} "
               f"{out['random_baselines'][label]:>9.4f} {out['centered_results'][label]:>+9.4f}")
    print0(f"{'CORE':<32} {'':>6} {'':>9} {'':>9} {out['core_metric']:>+9.4f}   ({elapsed:.1f}s, bundle {args.bundle})")

    if rank == 0:
        out_dir = os.path.join(base_dir, "base_eval")
        os.makedirs(out_dir, exist_ok=True)
        bundle_name = os.path.basename(os.path.normpath(out["bundle_dir"]))
        csv_path = os.path.join(out_dir, f"{model_tag}_step{step:06d}_{bundle_name}.csv")
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["task", "examples", "accuracy", "random_baseline", "centered"])
            for label in labels:
                w.writerow([label, out["counts"][label], f"{out['results'][label]:.6f}",
                            f"{out['random_baselines'][label]:.6f}", f"{out['centered_results'][label]:.6f}"])
            w.writerow(["CORE", "", "", "", f"{out['core_metric']:.6f}"])
        print0(f"wrote {csv_path}")
    get_report().log(section="Base model evaluation", data=[
        {"model_tag": model_tag, "step": step, "bundle": args.bundle, "max_per_task": args.max_per_task,
         "CORE metric": out["core_metric"], "eval time (s)": round(elapsed, 1)},
        {f"{label} (acc / centered)": f"{out['results'][label]:.4f} / {out['centered_results'][label]:+.4f}"
         for label in labels},
    ])
    compute_cleanup()


if __name__ == "__main__":
    main()
