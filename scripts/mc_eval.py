"""
Long-context quality of one checkpoint, MegaContext conditions side by side.

    python -m scripts.mc_eval                                   # latest base checkpoint, defaults below
    python -m scripts.mc_eval --source=mid --model_tag=d20 --step=5000 --num_docs=256 --out=mc.json
    python -m scripts.mc_eval --data_dir=my_texts --doc_tokens=8192 --num_probes=0
    python -m scripts.mc_eval --tasks=questions.jsonl           # rows {"context", "question", "answer"}
    torchrun --standalone --nproc_per_node=8 -m scripts.mc_eval # items split over ranks, gathered on rank 0

What it measures (mc/eval/conditions.py has the definitions and the math):
- conditions FULL, RECENCY, RECENCY-EQ, RECENCY-EQ-FOCUS, MEANPOOL, MC, MC-fixed, MC-KEYMATCH,
  MC-LensNet, SHUFFLED, ORACLE: the same history seen through different working-context plans; all
  keep at least the last W tokens raw (W = --mc_eval_wc_length, default sequence_len / 4), are scored on those
  W targets, and differ only in what stands for the tokens before that cut. RECENCY-EQ is RECENCY at
  equal entries: the last n raw tokens, n = the entries MC reads (covering + W); RECENCY-EQ-FOCUS the
  same at MC-fixed's entries. MC-fixed, MC-KEYMATCH, MC-LensNet and ORACLE get the same focus budget:
  the coarsest covering's entries + E (--focus_budget), spent by recency (MC-fixed), on the blocks whose
  mean-pooled layer-0 keys best match the question's queries (MC-KEYMATCH, parameter-free,
  mc/eval/keymatch_condition.py), by one LensNet + allocator refocus (MC-LensNet, mc/focus.py; "not available:
  <reason>" when the checkpoint has no LensNet) or on the needles' blocks (ORACLE); every block of
  results reports the mean entries each condition read;
- NLL and gap recovery R = (NLL_recency - NLL_cond) / (NLL_recency - NLL_full), and R_eq with RECENCY-EQ
  (and RECENCY-EQ-FOCUS) in place of RECENCY, with bootstrap 95% CIs over documents (mc/eval/stats.py), on
  three token sets reported separately: the horizon (last H window targets), the boundary (the first 64
  targets after the cut: local continuity) and the long-range answer tokens (recalled values whose
  source lies before the cut);
- exact match of recalled answers (greedy decoding of the answer tokens = argmax equal to the answer
  at every answer position given the true prefix: the two agree token by token until the first miss)
  on needle-in-a-haystack probes at m x W tokens (--probe_multipliers, default 4,16; passkeys and
  key-value facts, half of each straddling a block boundary, reported separately; mc/eval/data.py),
  on associative recall (K ledger pairs far before the cut, one query per refocus in the raw window;
  mc/eval/tasks.py), on the documents' long-range recalls, and on --tasks rows. Histories longer than
  sequence_len work for every condition but FULL (skipped there): they read <= W + gists + E entries;
- the GistNet diagnostic: NLL of the 64 tokens after the block just before the cut when that block is
  raw, replaced by its learned gist, by its mean-pool, or dropped (keys masked out).
Validity: the long-range result counts only when FULL itself shows the skill: >= 90% exact match on
in-context recalls (the probes where FULL fits, else the documents' recalls) and NLL_RECENCY -
NLL_FULL >= 0.02 nats on the long-range set. Otherwise JSON "valid" is false, "validity_reasons" says
why, the long-range R moves to "gap_recovery_unvalidated", and the table prints NOT VALID. Probe and
associative-recall blocks and the tasks carry their own validity (FULL's exact match on that task).
Every figure no passing verdict covers is marked "(not covered by validity)" in the table and has
covered_by_validity false in the JSON (mc/eval/report.py, "Coverage").
Figure: exact match against history length per condition (probes at each m x W, associative recall,
the documents' recalls), written next to the JSON (--plot; mc/eval/plot.py).

Efficiency: documents are batched (--batch_size); per batch one GistNet pass per gist type (the MC
tree, mc/tree.py), one refocus for MC-LensNet, and ONE GPT forward per condition over all items
(mc/eval/run.py). bf16 autocast on CUDA.
"""

import argparse
import dataclasses
import json
import os
import time

import torch

from mc.config import add_mc_flags
from mc.eval.conditions import BOUNDARY_TOKENS
from mc.eval.data import doc_item, probe_items, read_tasks, task_item, text_item
from mc.eval.plot import plot_exact_match
from mc.eval.report import summarize
from mc.eval.run import Setup, diagnose_batch, evaluate_batch, item_recalls, item_sets, run_items  # noqa: F401
from mc.eval.tasks import assoc_items
from mc.gistnet import GistNet
from mc.infer.checkpoint import load_model
from nanochat import cli_checks as ck
from nanochat.checkpoint_manager import SOURCE_DIRS, CheckpointError, find_last_model_tag
from nanochat.common import compute_cleanup, compute_init, die, get_base_dir, print0
from nanochat.dataset import iter_documents, resolve_source
from nanochat.report import get_report


def build_parser():
    p = argparse.ArgumentParser(description="MegaContext long-context evaluation of one checkpoint.", allow_abbrev=False)
    p.add_argument("--source", default="base", choices=["base", "mid", "sft"], help="checkpoint stage")
    p.add_argument("--model_tag", type=ck.model_tag, default=None,
                   help="<source>_checkpoints/<tag> (default: most recently written)")
    p.add_argument("--step", type=ck.nonneg_int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--device_type", default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--horizon", type=ck.nonneg_int, default=0, help="H: scored tail of the window (0 = W)")
    p.add_argument("--doc_tokens", type=ck.nonneg_int, default=0,
                   help="history length T of each document (0 = sequence_len)")
    p.add_argument("--num_docs", type=ck.nonneg_int, default=64, help="held-out documents (0 = none)")
    p.add_argument("--data_dir", default="", help="evaluate documents from this folder (.txt/.jsonl/.parquet) "
                                                  "instead of the synthetic corpus")
    p.add_argument("--data_split", default="val", choices=["train", "val"], help="split of --data_dir")
    p.add_argument("--tasks", default="", help="JSONL file of {context, question, answer} rows")
    p.add_argument("--num_probes", type=ck.nonneg_int, default=64, help="needle probes per length (0 = none)")
    p.add_argument("--probe_multipliers", default="4,16", help="probe history lengths as multiples of W, e.g. 4,16")
    p.add_argument("--num_assoc", type=ck.nonneg_int, default=16, help="associative-recall sequences (0 = none)")
    p.add_argument("--assoc_pairs", type=ck.positive_int, default=8, help="K: key-value pairs per sequence")
    p.add_argument("--assoc_queries", type=ck.positive_int, default=4, help="queries per sequence (one refocus each)")
    p.add_argument("--assoc_multiplier", type=ck.positive_int, default=4,
                   help="associative-recall history length in multiples of W")
    p.add_argument("--focus_budget", type=ck.nonneg_int, default=0,
                   help="E: entries beyond the covering for MC-fixed, MC-LensNet, ORACLE (0 = 4 x (block_size - 1))")
    p.add_argument("--batch_size", type=ck.positive_int, default=8, help="items per forward")
    p.add_argument("--gists", default="auto", choices=["auto", "learned", "mean"],
                   help="gists of the MC conditions: the checkpoint's GistNet (learned) or mean pooling")
    # the MC knobs an evaluation may override (default: the checkpoint's; a vanilla checkpoint gets MCConfig's):
    # W (--mc_eval_wc_length, 0 = sequence_len / 4 in whole blocks), the tree shape, the RoPE of gists, and
    # MC-LensNet's allocator iterations (default max(the checkpoint's, max_lod)). Old spellings warn for a release.
    add_mc_flags(p, names=("eval_wc_length", "block_size", "max_lod", "positional_type", "allocator_iterations"),
                 overrides=True, renamed={"eval_wc_length": ("--wc_length",), "block_size": ("--block_size",),
                                          "max_lod": ("--max_lod",)}, title="MegaContext overrides")
    p.add_argument("--diagnostic", type=ck.nonneg_int, default=1, help="run the GistNet diagnostic (0/1)")
    p.add_argument("--n_boot", type=ck.nonneg_int, default=1000, help="bootstrap replicates")
    p.add_argument("--seed", type=int, default=0, help="seed for data and bootstrap")
    p.add_argument("--out", default="", help="JSON output (default $NANOCHAT_BASE_DIR/mc_eval/<source>-<tag>-<step>.json)")
    p.add_argument("--plot", default="", help="exact match vs history length figure (PNG; default: --out with .png; "
                                              "none = no figure)")
    return p


def _checkpoint_settings(args, model, meta):
    mc_config = getattr(model, "mc_config", None)
    modules = getattr(model, "mc_modules", None)
    if "mc_config" in meta and modules is None:
        die("this checkpoint was trained with MegaContext (meta has mc_config) but build_model did not load its "
            "MC modules (model.mc_modules is None); update nanochat/checkpoint_manager.py")
    learned = getattr(modules, "gistnet", None) if modules is not None else None
    get = lambda flag, field, default: flag or (getattr(mc_config, field) if mc_config is not None else default)
    bs, max_lod, pos = get(args.mc_block_size, "block_size", 32), get(args.mc_max_lod, "max_lod", 2), \
        get(args.positional_type, "positional_type", "gaussian")
    if mc_config is not None and (bs, max_lod) != (mc_config.block_size, mc_config.max_lod):
        die(f"--mc_block_size/--mc_max_lod ({bs}/{max_lod}) differ from the checkpoint's ({mc_config.block_size}/"
            f"{mc_config.max_lod}); its GistNet was trained with those: drop the flags")
    if args.gists == "learned" and learned is None:
        die("--gists=learned but the checkpoint has no GistNet (a vanilla checkpoint); use --gists=auto or mean")
    return learned, bs, max_lod, pos


def _focus_settings(args, model, max_lod):
    """(lensnet or None, MCConfig for refocus or None, JSON info). MC-LensNet uses the checkpoint's
    allocator knobs with three changes: the budget is the eval's W_alloc (soft max length 0 = W_alloc),
    the whole budget is spent (expand threshold -1: every gist is a candidate, best score first; no
    collapses), and the iterations default to max(checkpoint's, max_lod) - one refocus per query has to
    be able to take a gist from the coarsest level down to raw, which the inference session does over
    several refocuses (mc/focus.py)."""
    mc_config = getattr(model, "mc_config", None)
    modules = getattr(model, "mc_modules", None)
    lensnet = getattr(modules, "lensnet", None) if modules is not None else None
    if args.allocator_iterations is not None and args.allocator_iterations < 0:
        die(f"--allocator_iterations={args.allocator_iterations} must be >= 0 (0 = max(checkpoint's, max_lod))")
    reason = None
    if mc_config is None:
        reason = "the checkpoint has no MegaContext modules (a vanilla checkpoint)"
    elif mc_config.lensnet_type == "none":
        reason = "the checkpoint was trained with --lensnet_type=none (fixed focus, no LensNet)"
    elif lensnet is None:
        reason = "the checkpoint holds no LensNet (trained before LensNet existed)"
    if reason is not None:
        return None, None, {"available": False, "reason": reason}
    iters = args.allocator_iterations or max(mc_config.allocator_iterations, max_lod)
    # equal budget: MC-LensNet spends the whole focus budget in LensNet's order, as MC-fixed and ORACLE do
    # (the thresholds are the session's choice of WHEN to spend; left on, LensNet read 188 entries where
    # MC-fixed read 264 on the recall checkpoint's documents). Collapses: none (scores lie in [-1, 1]).
    cfg = dataclasses.replace(mc_config, allocator_iterations=iters, allocator_soft_max_length=0,
                              allocator_expand_threshold=-1.0, allocator_collapse_threshold=-1.5)
    head_zero = bool((lensnet.head_out.weight == 0).all()) and float(getattr(lensnet, "match_gain", 0.0)) == 0.0
    knobs = {k: getattr(cfg, k) for k in ("allocator_type", "allocator_iterations", "allocator_max_replacements",
                                          "allocator_expand_threshold", "allocator_collapse_threshold")}
    info = {"available": True, "reason": None, "allocator": knobs, "head_zero": head_zero,
            "note": "LensNet's head is all zeros (never trained): every score is 0, so the allocator makes no "
                    "edit and MC-LensNet reads the bare covering" if head_zero else None}
    return lensnet.eval(), cfg, info


def _write_plot(result, flag, out):
    """{"path": str | None, "note": str | None}: the exact-match figure (mc/eval/plot.py) at --plot, or next
    to the JSON; never fails the run (the numbers are in the JSON either way)."""
    if flag == "none":
        return {"path": None, "note": "--plot=none"}
    path = flag or os.path.splitext(out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        written = plot_exact_match(result, path)
    except ImportError as e:
        return {"path": None, "note": f"matplotlib is not installed ({e}); pip install matplotlib"}
    return {"path": written, "note": None if written else "no exact-match block (no probes, assoc or doc recalls)"}


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    try:
        root = os.path.join(get_base_dir(), SOURCE_DIRS[args.source])
        model_tag = args.model_tag or find_last_model_tag(root)
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=model_tag, step=args.step)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        die(str(e))
    step = meta.get("_checkpoint", {}).get("step", args.step)
    learned, bs, max_lod, pos_type = _checkpoint_settings(args, model, meta)
    T_seq = model.config.sequence_len
    W = args.mc_eval_wc_length or (T_seq // 4) // bs * bs
    H = args.horizon or W
    T_doc = args.doc_tokens or T_seq
    if W < 1 or W % bs or W > T_seq:
        die(f"--mc_eval_wc_length={W} must be a positive multiple of the block size {bs}, at most sequence_len={T_seq}")
    if not 1 <= H <= W:
        die(f"--horizon={H} must be in [1, W={W}]: scored tokens must be raw in every condition")
    if T_doc % bs or T_doc < W:
        die(f"--doc_tokens={T_doc} must be a multiple of the block size {bs} and at least W={W}")
    try:
        multipliers = [int(m) for m in args.probe_multipliers.split(",") if m.strip()]
    except ValueError:
        die(f"--probe_multipliers={args.probe_multipliers!r} must be comma-separated integers, e.g. 4,16")
    if any(m < 2 for m in multipliers):
        die("--probe_multipliers must be >= 2 (the needle has to lie before the last-W window)")
    if args.focus_budget < 0:
        die(f"--focus_budget={args.focus_budget} must be >= 0 (0 = 4 x (block_size - 1))")
    E = args.focus_budget or 4 * (bs - 1)
    if args.num_assoc > 0 and args.assoc_multiplier < 2:
        die(f"--assoc_multiplier={args.assoc_multiplier} must be >= 2 (the pairs have to lie before the last-W window)")
    gist_source = "learned" if (learned is not None and args.gists != "mean") else "mean"
    meanpool = GistNet(model.config.n_embd, bs, gistnet_type="mean")
    gistnet = learned.to(device).eval() if gist_source == "learned" else meanpool
    lensnet, focus_cfg, lens_info = _focus_settings(args, model, max_lod)
    setup = Setup(model, gistnet, meanpool, W, H, bs, max_lod, pos_type, args.batch_size, focus_budget=E,
                  lensnet=lensnet, focus_cfg=focus_cfg, generator=torch.Generator().manual_seed(args.seed))
    piece_bytes = tokenizer.token_bytes().numpy()

    # ---------------------------------------------------------------------------------------------
    # items: documents, probes, tasks
    docs, skipped = [], {}
    if args.num_docs > 0 and args.data_dir:
        try:
            src = resolve_source("dir", args.data_dir)
        except ValueError as e:
            die(str(e))
        seen = set()
        for text in iter_documents(src, args.data_split):
            if len(docs) >= args.num_docs or hash(text) in seen or len(seen) >= 100 * args.num_docs:
                break
            seen.add(hash(text))
            item = text_item(tokenizer, text, T_doc)
            if item is None:
                skipped["docs_shorter_than_doc_tokens"] = skipped.get("docs_shorter_than_doc_tokens", 0) + 1
            else:
                docs.append(item)
        if not docs:
            die(f"no document in {args.data_dir} ({args.data_split} split) has {T_doc + 1} tokens; lower --doc_tokens")
    elif args.num_docs > 0:
        docs = [doc_item(tokenizer, piece_bytes, i, T_doc, W, H, seed=args.seed) for i in range(args.num_docs)]
    probes = {m: probe_items(tokenizer, args.num_probes, m * W, W, bs, seed=args.seed) for m in multipliers} \
        if args.num_probes > 0 else {}
    tasks = []
    if args.tasks:
        try:
            tasks = [task_item(tokenizer, piece_bytes, row, W, H, bs) for row in read_tasks(args.tasks)]
        except FileNotFoundError:
            die(f"--tasks file {args.tasks} does not exist; give a JSONL file of {{context, question, answer}} rows")
        except (OSError, ValueError) as e:
            die(str(e))
    assoc = []
    if args.num_assoc > 0:
        try:
            assoc = assoc_items(tokenizer, piece_bytes, args.num_assoc, args.assoc_multiplier * W, W, bs,
                                args.assoc_pairs, args.assoc_queries, seed=args.seed)
        except ValueError as e:
            die(str(e))
    print0(f"mc_eval: {args.source}/{model_tag} step {step}, W={W} H={H} T={T_doc}, gists={gist_source}, E={E}, "
           f"MC-LensNet {'on' if lensnet is not None else 'not available: ' + lens_info['reason']}; "
           f"{len(docs)} docs, {sum(map(len, probes.values()))} probes, {len(assoc)} assoc queries, {len(tasks)} tasks")

    # ---------------------------------------------------------------------------------------------
    # evaluate
    doc_res, doc_meta, diag = run_items(setup, docs, rank, world_size, bool(args.diagnostic))
    probe_out = {m: run_items(setup, its, rank, world_size, False)[:2] for m, its in probes.items()}
    task_res, task_meta = run_items(setup, tasks, rank, world_size, False)[:2] if tasks else ([], [])
    assoc_res, assoc_meta = run_items(setup, assoc, rank, world_size, False)[:2] if assoc else ([], [])
    if rank != 0:
        compute_cleanup()
        return None

    # ---------------------------------------------------------------------------------------------
    # statistics, validity, outputs
    settings = {"wc_length": W, "horizon": H, "doc_tokens": T_doc, "sequence_len": T_seq, "block_size": bs,
                "max_lod": max_lod, "positional_type": pos_type, "gists": gist_source,
                "gistnet": "checkpoint GistNet" if gist_source == "learned" else
                ("mean pooling (checkpoint has no learned GistNet)" if learned is None else "mean pooling (--gists=mean)"),
                "boundary_tokens": BOUNDARY_TOKENS, "n_boot": args.n_boot, "seed": args.seed, "device": str(device),
                "data": f"dir:{args.data_dir}:{args.data_split}" if args.data_dir else "synthetic:val",
                "tasks": args.tasks or None, "probe_multipliers": multipliers, "focus_budget": E,
                "assoc": {"sequences": args.num_assoc, "pairs": args.assoc_pairs, "queries": args.assoc_queries,
                          "history_tokens": args.assoc_multiplier * W} if assoc else None,
                "lensnet": lens_info}
    doc_stats = {"sets": [item_sets(it, r, W, H) for it, r in zip(docs, doc_res)],
                 "recalls": [item_recalls(it, r, W, True) for it, r in zip(docs, doc_res)], "diagnostic": diag,
                 "meta": doc_meta}
    probe_stats = {m: [(it, item_recalls(it, r, W, False), mt) for it, r, mt in zip(probes[m], *probe_out[m])]
                   for m in probes}
    task_stats = [item_recalls(it, r, W, False) for it, r in zip(tasks, task_res)]
    assoc_stats = [(it, item_recalls(it, r, W, False), mt) for it, r, mt in zip(assoc, assoc_res, assoc_meta)]
    result, table, summary = summarize(settings, doc_stats, probe_stats, task_stats, args.n_boot, args.seed,
                                       assoc_stats=assoc_stats, task_meta=task_meta)
    result["checkpoint"] = {"source": args.source, "model_tag": model_tag, "step": step, "sequence_len": T_seq,
                            "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                            "vocab_size": model.config.vocab_size, "mc": learned is not None}
    result["skipped"] = skipped
    result["elapsed_s"] = round(time.time() - t0, 2)
    out = args.out or os.path.join(get_base_dir(), "mc_eval", f"{args.source}-{model_tag}-{step}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    result["plot"] = _write_plot(result, args.plot, out)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    header = f"### MC evaluation: {args.source}/{model_tag} step {step}\n\n"
    plot_line = f"\nPlot: {result['plot']['path']}" if result["plot"]["path"] else f"\nPlot: none ({result['plot']['note']})"
    print0(header + table + f"\n\nJSON: {out}  ({result['elapsed_s']} s)" + plot_line)
    report = get_report()
    figure = []  # the figure inside report.md, by a path relative to it when it sits in the report folder
    if result["plot"]["path"] and getattr(report, "report_dir", None):  # (other ranks: a DummyReport)
        rel = os.path.relpath(result["plot"]["path"], report.report_dir)
        where = rel if not rel.startswith("..") else os.path.abspath(result["plot"]["path"])
        figure = [f"![mc_eval: exact match vs history length, R per window]({where})"]
    report.log(section="MC evaluation", data=[{**summary, "json": out, "plot": result["plot"]["path"]}, table, *figure])
    compute_cleanup()
    return result


if __name__ == "__main__":
    main()
