"""
Long-context quality of one checkpoint, MegaContext conditions side by side.

    python -m scripts.mc_eval                                   # latest base checkpoint, defaults below
    python -m scripts.mc_eval --source=mid --model_tag=d20 --step=5000 --num_docs=256 --out=mc.json
    python -m scripts.mc_eval --data_dir=my_texts --doc_tokens=8192 --num_probes=0
    python -m scripts.mc_eval --tasks=questions.jsonl           # rows {"context", "question", "answer"}
    torchrun --standalone --nproc_per_node=8 -m scripts.mc_eval # items split over ranks, gathered on rank 0

What it measures (mc/eval_conditions.py has the definitions and the math):
- conditions FULL, RECENCY, MEANPOOL, MC, SHUFFLED, ORACLE: the same history seen through different
  working-context plans; all but FULL keep the last W tokens raw (W = --wc_length, default
  sequence_len / 4) and differ only in what stands for the tokens before that cut;
- NLL and gap recovery R = (NLL_recency - NLL_cond) / (NLL_recency - NLL_full) with bootstrap 95% CIs
  over documents (mc/stats.py), on three token sets reported separately: the horizon (last H window
  targets), the boundary (the first 64 targets after the cut: local continuity) and the long-range
  answer tokens (recalled values whose source lies before the cut);
- exact match of recalled answers (greedy decoding of the answer tokens = argmax equal to the answer
  at every answer position given the true prefix: the two agree token by token until the first miss)
  on needle-in-a-haystack probes at m x W tokens (--probe_multipliers, default 4; passkeys and
  key-value facts, one in four straddling a block boundary; mc/eval_data.py), on the documents'
  long-range recalls, and on --tasks rows;
- the GistNet diagnostic: NLL of the 64 tokens after the block just before the cut when that block is
  raw, replaced by its learned gist, by its mean-pool, or dropped (keys masked out).
Validity: the long-range result counts only when FULL itself shows the skill: >= 90% exact match on
in-context recalls (the probes where FULL fits, else the documents' recalls) and NLL_RECENCY -
NLL_FULL >= 0.02 nats on the long-range set. Otherwise JSON "valid" is false, "validity_reasons" says
why, the long-range R moves to "gap_recovery_unvalidated", and the table prints NOT VALID.

Efficiency: documents are batched (--batch_size); per batch one GistNet pass per gist type (the MC
tree, mc/tree.py) and ONE GPT forward per condition over all items: every condition is a plan ->
mc/working_context.build_working_context -> inputs_embeds + per-entry rotary (mc/positions.py) +
key-padding mask. bf16 autocast on CUDA.
"""

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mc.eval_conditions import (
    BOUNDARY_TOKENS,
    CONDITIONS,
    answer_mask,
    covering_plan,
    diagnostic_plans,
    full_plan,
    oracle_plan,
    pad_left,
    recency_plan,
    window_masks,
)
from mc.eval_data import doc_item, probe_items, read_tasks, task_item, text_item
from mc.eval_report import summarize
from mc.gistnet import GistNet
from mc.positions import rope_cos_sin
from mc.tree import MegaContextTree
from mc.working_context import build_working_context
from nanochat.checkpoint_manager import SOURCE_DIRS, CheckpointError, find_last_model_tag, load_model
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, die, get_base_dir, print0
from nanochat.dataset import iter_documents, resolve_source
from nanochat.report import get_report


def build_parser():
    p = argparse.ArgumentParser(description="MegaContext long-context evaluation of one checkpoint.", allow_abbrev=False)
    p.add_argument("--source", default="base", choices=["base", "mid", "sft"], help="checkpoint stage")
    p.add_argument("--model_tag", default=None, help="<source>_checkpoints/<tag> (default: most recently written)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--device_type", default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--wc_length", type=int, default=0, help="W: raw window / RECENCY length (0 = sequence_len / 4)")
    p.add_argument("--horizon", type=int, default=0, help="H: scored tail of the window (0 = W)")
    p.add_argument("--doc_tokens", type=int, default=0, help="history length T of each document (0 = sequence_len)")
    p.add_argument("--num_docs", type=int, default=64, help="held-out documents (0 = none)")
    p.add_argument("--data_dir", default="", help="evaluate documents from this folder (.txt/.jsonl/.parquet) "
                                                  "instead of the synthetic corpus")
    p.add_argument("--data_split", default="val", choices=["train", "val"], help="split of --data_dir")
    p.add_argument("--tasks", default="", help="JSONL file of {context, question, answer} rows")
    p.add_argument("--num_probes", type=int, default=64, help="needle probes per length (0 = none)")
    p.add_argument("--probe_multipliers", default="4", help="probe history lengths as multiples of W, e.g. 4,16")
    p.add_argument("--batch_size", type=int, default=8, help="items per forward")
    p.add_argument("--gists", default="auto", choices=["auto", "learned", "mean"],
                   help="gists of MC/SHUFFLED/ORACLE: the checkpoint's GistNet (learned) or mean pooling")
    p.add_argument("--block_size", type=int, default=0, help="tokens per gist (0 = the checkpoint's, else 32)")
    p.add_argument("--max_lod", type=int, default=0, help="coarsest gist level (0 = the checkpoint's, else 2)")
    p.add_argument("--positional_type", default="", choices=["", "simple", "gaussian"],
                   help="RoPE of gists (empty = the checkpoint's, else gaussian)")
    p.add_argument("--diagnostic", type=int, default=1, help="run the GistNet diagnostic (0/1)")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap replicates")
    p.add_argument("--seed", type=int, default=0, help="seed for data and bootstrap")
    p.add_argument("--out", default="", help="JSON output (default $NANOCHAT_BASE_DIR/mc_eval/<source>-<tag>-<step>.json)")
    return p


@dataclass
class Setup:
    model: torch.nn.Module
    gistnet: torch.nn.Module      # the gists of MC / SHUFFLED / ORACLE
    meanpool: torch.nn.Module     # GistNet type mean
    W: int
    H: int
    block_size: int
    max_lod: int
    positional_type: str
    batch_size: int

    @property
    def seq_len(self):
        return self.model.config.sequence_len


# -------------------------------------------------------------------------------------------------
# forward passes


def forward_tail(setup, parts, keep: int, key_drop=None):
    """One GPT forward over working contexts from several groups, right-aligned and padded together.

    parts: list of (wc, targets [b, w]) with targets the window's tokens (the last w entries of each
    row). Returns (nll [R, keep], correct [R, keep]) float/bool numpy, aligned to the right (-1 targets
    give nll 0, correct False). key_drop: optional list of bool [b, L_g] entries to hide as keys."""
    L = max(wc.valid.size(1) for wc, _ in parts)
    cat = lambda name, v: torch.cat([pad_left(getattr(wc, name), L, v) for wc, _ in parts])
    emb, pos, span, valid = cat("embeddings", 0.0), cat("positions", 0.0), cat("span_len", 0), cat("valid", False)
    if key_drop is not None:
        valid = valid & ~torch.cat([pad_left(d, L, False) for d in key_drop])
    tgt = torch.cat([pad_left(t, keep, -1) for _, t in parts])
    model = setup.model
    cos, sin = rope_cos_sin(pos, model.config.n_embd // model.config.n_head, span, setup.positional_type)
    logits = model(inputs_embeds=emb, cos_sin_override=(cos, sin), key_padding_mask=None if valid.all() else valid)
    tail = logits[:, -keep:].float()
    nll = F.cross_entropy(tail.reshape(-1, tail.size(-1)), tgt.reshape(-1), ignore_index=-1, reduction="none")
    correct = (tail.argmax(-1) == tgt) & (tgt >= 0)
    return nll.view(tgt.shape).cpu().numpy(), correct.cpu().numpy()


def _cyclic_units(level, n):
    """[1, n, C]: the units of one donor row, repeated cyclically to n (a donor may be shorter)."""
    return level[:1, torch.arange(n, device=level.device) % level.size(1)]


def donor_levels(groups, g, stash):
    """Gist levels from ANOTHER document for group g (SHUFFLED): the next row of the same group when it
    has two or more rows, else another group of the batch, else the previous batch (stash); None if none."""
    levels = groups[g]["learned"]
    if levels[0].size(0) >= 2:
        return [levels[0]] + [lv.roll(1, 0) for lv in levels[1:]]
    others = [groups[h]["learned"] for h in range(len(groups)) if h != g] + ([stash] if stash is not None else [])
    for donor in others:
        if all(d.size(1) > 0 or lv.size(1) == 0 for d, lv in zip(donor[1:], levels[1:])):
            return [levels[0]] + [_cyclic_units(d, lv.size(1)) if lv.size(1) else lv for d, lv in zip(donor[1:], levels[1:])]
    return None


def _trees(setup, x):
    """(lod0, learned levels, mean levels) for a batch of histories x [b, T]: one GistNet pass per level."""
    lod0 = setup.model.transformer.wte(x)
    mean = MegaContextTree.build(lod0, setup.meanpool, setup.block_size, setup.max_lod).levels
    learned = mean if setup.gistnet is setup.meanpool else \
        MegaContextTree.build(lod0, setup.gistnet, setup.block_size, setup.max_lod).levels
    return lod0, learned, mean


def plans_for(setup, cond, items, T):
    """int8 [b, T] plans of one condition for items of history length T (None: condition not run)."""
    W, bs, lod = setup.W, setup.block_size, setup.max_lod
    if cond == "FULL":
        return full_plan(T).expand(len(items), T) if T <= setup.seq_len else None
    if cond == "RECENCY":
        return recency_plan(T, W).expand(len(items), T)
    if cond == "ORACLE":
        return torch.stack([oracle_plan(T, W, it.needles, bs, lod) for it in items])
    return covering_plan(T, W, bs, lod).expand(len(items), T)


@torch.inference_mode()
def evaluate_batch(setup, items, stash=None):
    """Score every condition on a batch of items. Returns (results, entries, stash): results[k][cond] =
    (nll [Wr], correct [Wr]) numpy over item k's window targets; entries[cond] = WC lengths."""
    device = setup.model.get_device()
    by_T = {}
    for k, it in enumerate(items):
        by_T.setdefault(it.T, []).append(k)
    groups = []
    for T, ks in by_T.items():
        ids = torch.tensor([items[k].ids for k in ks], dtype=torch.long, device=device)
        lod0, learned, mean = _trees(setup, ids[:, :T])
        groups.append({"T": T, "ks": ks, "ids": ids, "learned": learned, "mean": mean, "Wr": min(setup.W, T)})
    results = [dict() for _ in items]
    entries = {}
    for cond in CONDITIONS:
        parts, rows = [], []
        for g, grp in enumerate(groups):
            plans = plans_for(setup, cond, [items[k] for k in grp["ks"]], grp["T"])
            levels = {"MEANPOOL": grp["mean"], "SHUFFLED": None}.get(cond, grp["learned"])
            if cond == "SHUFFLED":
                levels = donor_levels(groups, g, stash)
            if plans is None or levels is None:
                continue
            wc = build_working_context(plans.to(device), levels, setup.block_size)
            parts.append((wc, grp["ids"][:, grp["T"] - grp["Wr"] + 1:]))
            rows += [(k, grp["Wr"]) for k in grp["ks"]]
            entries.setdefault(cond, []).extend(wc.valid.sum(1).tolist())
        if not parts:
            continue
        nll, correct = forward_tail(setup, parts, max(w for _, w in rows))
        for r, (k, w) in enumerate(rows):
            results[k][cond] = (nll[r, -w:], correct[r, -w:])
    return results, entries, groups[0]["learned"]


@torch.inference_mode()
def diagnose_batch(setup, items):
    """GistNet diagnostic per item: mean NLL of the F tokens after the block [c, c + bs), c = T - W - bs,
    when that block is raw / one learned gist / one mean-pool gist / dropped. {k: {variant: nll}}."""
    bs, W = setup.block_size, setup.W
    F_ = min(BOUNDARY_TOKENS, W)
    ks = [k for k, it in enumerate(items) if it.T - W - bs >= 0]
    if not ks:
        return {}
    T = items[ks[0]].T
    ks = [k for k in ks if items[k].T == T]
    c = T - W - bs
    Td = c + bs + F_
    ids = torch.tensor([items[k].ids for k in ks], dtype=torch.long, device=setup.model.get_device())
    lod0, learned, mean = _trees(setup, ids[:, :Td])
    plans = {name: p.expand(len(ks), Td).to(ids.device) for name, p in diagnostic_plans(c, W, F_, bs).items()}
    tgt = ids[:, Td - F_ + 1: Td + 1]
    out = {}
    for name, plan_name, levels in (("raw", "raw", [lod0]), ("gist", "gist", learned[:2]),
                                    ("meanpool", "gist", mean[:2]), ("dropped", "raw", [lod0])):
        wc = build_working_context(plans[plan_name], levels, bs)
        drop = None
        if name == "dropped":
            drop = [(wc.span_start >= c) & (wc.span_start < c + bs) & wc.valid]
        nll, _ = forward_tail(setup, [(wc, tgt)], F_, key_drop=drop)
        out[name] = nll.mean(1)
    return {k: {name: float(v[i]) for name, v in out.items()} for i, k in enumerate(ks)}


def run_items(setup, items, rank, world_size, diagnostic):
    """Evaluate this rank's share of items in batches; gather everything on every rank."""
    mine = [k for k in range(len(items)) if k % world_size == rank]
    results, entries, diag, stash = {}, {}, {}, None
    for i in range(0, len(mine), setup.batch_size):
        ks = mine[i: i + setup.batch_size]
        batch = [items[k] for k in ks]
        with autocast_ctx(setup.model.get_device().type):
            res, ent, stash = evaluate_batch(setup, batch, stash)
            dg = diagnose_batch(setup, batch) if diagnostic else {}
        results.update({ks[j]: r for j, r in enumerate(res)})
        diag.update({ks[j]: d for j, d in dg.items()})
        for c, v in ent.items():
            entries.setdefault(c, []).extend(v)
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (results, entries, diag))
        results, entries, diag = {}, {}, {}
        for res, ent, dg in gathered:
            results.update(res)
            diag.update(dg)
            for c, v in ent.items():
                entries.setdefault(c, []).extend(v)
    return [results[k] for k in range(len(items))], entries, [diag.get(k) for k in range(len(items))]


# -------------------------------------------------------------------------------------------------
# per-item token-set sums (what the statistics resample)


def item_sets(item, res, W, H):
    """{set: {cond: (nll_sum, count)}} for the horizon, boundary and long-range sets of one document."""
    masks = window_masks(item.T, W, H)
    masks["long_range"] = answer_mask(item.T, W, [a.span for a in item.answers if a.long_range])
    return {name: {c: (float(nll[m].sum()), int(m.sum())) for c, (nll, _) in res.items()} for name, m in masks.items()}


def item_recalls(item, res, W, only_long_range):
    """{cond: [exact match per answer]}: every answer token argmax-correct."""
    out = {}
    for c, (_, correct) in res.items():
        out[c] = [bool(correct[answer_mask(item.T, W, [a.span])].all()) for a in item.answers
                  if a.long_range or not only_long_range]
    return out


# -------------------------------------------------------------------------------------------------


def _checkpoint_settings(args, model, meta):
    mc_config = getattr(model, "mc_config", None)
    modules = getattr(model, "mc_modules", None)
    if "mc_config" in meta and modules is None:
        die("this checkpoint was trained with MegaContext (meta has mc_config) but build_model did not load its "
            "MC modules (model.mc_modules is None); update nanochat/checkpoint_manager.py")
    learned = getattr(modules, "gistnet", None) if modules is not None else None
    get = lambda flag, field, default: flag or (getattr(mc_config, field) if mc_config is not None else default)
    bs, max_lod, pos = get(args.block_size, "block_size", 32), get(args.max_lod, "max_lod", 2), \
        get(args.positional_type, "positional_type", "gaussian")
    if mc_config is not None and (bs, max_lod) != (mc_config.block_size, mc_config.max_lod):
        die(f"--block_size/--max_lod ({bs}/{max_lod}) differ from the checkpoint's ({mc_config.block_size}/"
            f"{mc_config.max_lod}); its GistNet was trained with those: drop the flags")
    if args.gists == "learned" and learned is None:
        die("--gists=learned but the checkpoint has no GistNet (a vanilla checkpoint); use --gists=auto or mean")
    return learned, bs, max_lod, pos


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
    W = args.wc_length or (T_seq // 4) // bs * bs
    H = args.horizon or W
    T_doc = args.doc_tokens or T_seq
    if W < 1 or W % bs or W > T_seq:
        die(f"--wc_length={W} must be a positive multiple of the block size {bs}, at most sequence_len={T_seq}")
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
    gist_source = "learned" if (learned is not None and args.gists != "mean") else "mean"
    meanpool = GistNet(model.config.n_embd, bs, gistnet_type="mean")
    gistnet = learned.to(device).eval() if gist_source == "learned" else meanpool
    setup = Setup(model, gistnet, meanpool, W, H, bs, max_lod, pos_type, args.batch_size)
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
    print0(f"mc_eval: {args.source}/{model_tag} step {step}, W={W} H={H} T={T_doc}, gists={gist_source}, "
           f"{len(docs)} docs, {sum(map(len, probes.values()))} probes, {len(tasks)} tasks")

    # ---------------------------------------------------------------------------------------------
    # evaluate
    doc_res, entries, diag = run_items(setup, docs, rank, world_size, bool(args.diagnostic))
    probe_res = {m: run_items(setup, its, rank, world_size, False)[0] for m, its in probes.items()}
    task_res = run_items(setup, tasks, rank, world_size, False)[0] if tasks else []
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
                "tasks": args.tasks or None, "probe_multipliers": multipliers}
    doc_stats = {"sets": [item_sets(it, r, W, H) for it, r in zip(docs, doc_res)],
                 "recalls": [item_recalls(it, r, W, True) for it, r in zip(docs, doc_res)], "diagnostic": diag}
    probe_stats = {m: [(it, item_recalls(it, r, W, False)) for it, r in zip(probes[m], probe_res[m])] for m in probes}
    task_stats = [item_recalls(it, r, W, False) for it, r in zip(tasks, task_res)]
    result, table, summary = summarize(settings, doc_stats, probe_stats, task_stats, entries, args.n_boot, args.seed)
    result["checkpoint"] = {"source": args.source, "model_tag": model_tag, "step": step, "sequence_len": T_seq,
                            "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                            "vocab_size": model.config.vocab_size, "mc": learned is not None}
    result["skipped"] = skipped
    result["elapsed_s"] = round(time.time() - t0, 2)
    out = args.out or os.path.join(get_base_dir(), "mc_eval", f"{args.source}-{model_tag}-{step}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    header = f"### MC evaluation: {args.source}/{model_tag} step {step}\n\n"
    print0(header + table + f"\n\nJSON: {out}  ({result['elapsed_s']} s)")
    get_report().log(section="MC evaluation", data=[{**summary, "json": out}, table])
    compute_cleanup()
    return result


if __name__ == "__main__":
    main()
