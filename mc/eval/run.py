"""
The batched evaluator behind scripts/mc_eval.py: every condition's plan for a batch of items, one GPT
forward per condition, per-item NLL / argmax-correct over the raw window's targets.

Per batch: items are grouped by history length T; per group one tree per gist type (MegaContextTree:
one GistNet pass per level), then per condition the plans [b, T] (mc/eval/conditions.py defines them)
-> build_working_context -> inputs_embeds + per-entry rotary (mc/positions.py computes cos/sin from
the positions themselves, so histories far beyond the GPT's own rotary table, 10 x sequence_len, are
fine) + key-padding mask -> ONE GPT forward over all groups of the condition (right-aligned, padded).

Equal-entries baselines (pure, mc/eval/conditions.equal_entries_plan): RECENCY-EQ reads the last n raw
tokens, n = MC's entries (the covering); RECENCY-EQ-FOCUS the last n' raw tokens, n' = MC-fixed's entries
(covering + E). Both are scored on the same last-W window targets as every other condition.

Focus conditions (budget E = setup.focus_budget entries on top of the covering's):
    MC-fixed    recency_focus of the covering (pure, mc/eval/conditions.py)
    MC-KEYMATCH the blocks whose mean-pooled layer-0 keys best match the question's layer-0 queries made
                raw (mc/eval/keymatch_condition.py; parameter-free, reads the GPT's c_k / c_q weights only)
    MC-LensNet  mc/focus.refocus(lensnet, covering, the learned tree levels, cfg, W = covering + E,
                recent_tokens = W_raw): one LensNet scoring of the covering's working context + one
                allocator call of cfg.allocator_iterations iterations (the children of an expanded
                gist inherit its score, so LOD2 -> LOD1 -> raw can happen in one call). The whole raw
                window is protected, so every condition scores the same raw targets. Skipped (not
                available) when the checkpoint has no LensNet.
    ORACLE      the needles' blocks raw first, the rest of E like MC-fixed.
Each item is its own refocus: a probe or an associative-recall query is scored right after the
refocus that saw its question in the raw window ("one query per refocus").
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mc.eval.conditions import (
    BOUNDARY_TOKENS,
    CONDITIONS,
    answer_mask,
    check_cut,
    covering_plan,
    diagnostic_plans,
    equal_entries_plan,
    fixed_focus_plan,
    full_plan,
    oracle_plan,
    pad_left,
    plan_entries,
    recency_plan,
    window_masks,
)
from mc.eval.keymatch_condition import keymatch_focus, query_end
from mc.focus import refocus
from mc.keymatch import tail_block_scores
from mc.positions import rope_cos_sin
from mc.tree import MegaContextTree
from mc.working_context import build_working_context
from nanochat.common import autocast_ctx


@dataclass
class Setup:
    model: torch.nn.Module
    gistnet: torch.nn.Module      # the gists of MC / MC-fixed / MC-LensNet / SHUFFLED / ORACLE
    meanpool: torch.nn.Module     # GistNet type mean
    W: int
    H: int
    block_size: int
    max_lod: int
    positional_type: str
    batch_size: int
    focus_budget: int = 0         # E: entries beyond the covering for MC-fixed, MC-LensNet, ORACLE
    lensnet: torch.nn.Module | None = None   # None: MC-LensNet is not available
    focus_cfg: object = None      # MCConfig with the allocator knobs refocus uses
    generator: torch.Generator | None = None  # stochastic_greedy draws (CPU, seeded)

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
    cos, sin = rope_cos_sin(pos, model.config.n_embd // model.config.n_head, span, setup.positional_type,
                            rope_fraction=model.config.rope_fraction)
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


def lensnet_plans(setup, items, T: int, levels):
    """MC-LensNet: (plans int8 [rows, T], per-row stats) from one refocus of the covering (module
    docstring); None when the checkpoint has no LensNet. A content-matching LensNet (--lensnet_match=1)
    reads the blocks before the raw window scored against the last token of each item's question (never
    its answer), as the inference session does (mc/keymatch.py)."""
    if setup.lensnet is None:
        return None
    rows, bs = len(items), setup.block_size
    base = covering_plan(T, setup.W, bs, setup.max_lod)
    budget = plan_entries(base, bs) + setup.focus_budget
    plan0 = base.to(levels[0].device).expand(rows, T).contiguous()
    match_z = None
    if getattr(setup.lensnet, "match", False):
        ends = torch.tensor([query_end([a.span for a in it.answers], T, setup.W) for it in items], device=plan0.device)
        match_z = tail_block_scores(setup.model, levels[0], ends, 1, check_cut(T, setup.W, bs), bs)
    plans, _, info = refocus(setup.lensnet, plan0, levels, setup.focus_cfg, budget, generator=setup.generator,
                             recent_tokens=min(setup.W, T), match_z=match_z)
    # scores of the covering's gists (the candidates): the WC is right-aligned, gists first, then the
    # min(W, T) raw window entries
    n_gists = plan_entries(base, setup.block_size) - min(setup.W, T)
    L = info["scores"].size(1)
    sc = info["scores"].float()[:, L - n_gists - min(setup.W, T): L - min(setup.W, T)].cpu()
    stats = [{"expands": int(info["expands"][r]), "collapses": int(info["collapses"][r]),
              "changed": bool(info["changed"][r]),
              "score_abs_mean": float(sc[r].abs().mean()) if n_gists else 0.0,
              "score_max": float(sc[r].max()) if n_gists else 0.0} for r in range(rows)]
    return plans, stats


def plans_for(setup, cond, items, T, levels=None):
    """(int8 [b, T] plans of one condition for items of history length T, per-row stats or None);
    plans None: the condition does not run here."""
    W, bs, lod, E = setup.W, setup.block_size, setup.max_lod, setup.focus_budget
    b = len(items)
    if cond == "FULL":
        return (full_plan(T).expand(b, T) if T <= setup.seq_len else None), None
    if cond == "RECENCY":
        return recency_plan(T, W).expand(b, T), None
    if cond == "RECENCY-EQ":
        return equal_entries_plan(covering_plan(T, W, bs, lod), bs).expand(b, T), None
    if cond == "RECENCY-EQ-FOCUS":
        return equal_entries_plan(fixed_focus_plan(T, W, E, bs, lod), bs).expand(b, T), None
    if cond == "MC-fixed":
        return fixed_focus_plan(T, W, E, bs, lod).expand(b, T), None
    if cond == "MC-KEYMATCH":
        return keymatch_focus(setup.model, levels[0], [[a.span for a in it.answers] for it in items], W, E, bs,
                              lod), None
    if cond == "MC-LensNet":
        out = lensnet_plans(setup, items, T, levels)
        return (None, None) if out is None else out
    if cond == "ORACLE":
        return torch.stack([oracle_plan(T, W, it.needles, bs, lod, budget_extra=E) for it in items]), None
    return covering_plan(T, W, bs, lod).expand(b, T), None


@torch.inference_mode()
def evaluate_batch(setup, items, stash=None):
    """Score every condition on a batch of items. Returns (results, meta, stash): results[k][cond] =
    (nll [Wr], correct [Wr]) numpy over item k's window targets; meta[k] = {"entries": {cond: WC
    length}, "lens": MC-LensNet refocus stats or None}; stash = learned levels for the next SHUFFLED."""
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
    meta = [{"entries": {}, "lens": None} for _ in items]
    for cond in CONDITIONS:
        parts, rows = [], []
        for g, grp in enumerate(groups):
            plans, stats = plans_for(setup, cond, [items[k] for k in grp["ks"]], grp["T"], grp["learned"])
            levels = {"MEANPOOL": grp["mean"], "SHUFFLED": None}.get(cond, grp["learned"])
            if cond == "SHUFFLED":
                levels = donor_levels(groups, g, stash)
            if plans is None or levels is None:
                continue
            wc = build_working_context(plans.to(device), levels, setup.block_size)
            parts.append((wc, grp["ids"][:, grp["T"] - grp["Wr"] + 1:]))
            rows += [(k, grp["Wr"]) for k in grp["ks"]]
            for j, (k, n) in enumerate(zip(grp["ks"], wc.valid.sum(1).tolist())):
                meta[k]["entries"][cond] = n
                if stats is not None:
                    meta[k]["lens"] = stats[j]
        if not parts:
            continue
        nll, correct = forward_tail(setup, parts, max(w for _, w in rows))
        for r, (k, w) in enumerate(rows):
            results[k][cond] = (nll[r, -w:], correct[r, -w:])
    return results, meta, groups[0]["learned"]


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
    """Evaluate this rank's share of items in batches; gather everything on every rank.
    Returns (results per item, meta per item, diagnostic per item or None)."""
    mine = [k for k in range(len(items)) if k % world_size == rank]
    results, meta, diag, stash = {}, {}, {}, None
    for i in range(0, len(mine), setup.batch_size):
        ks = mine[i: i + setup.batch_size]
        batch = [items[k] for k in ks]
        with autocast_ctx(setup.model.get_device().type):
            res, mt, stash = evaluate_batch(setup, batch, stash)
            dg = diagnose_batch(setup, batch) if diagnostic else {}
        results.update({ks[j]: r for j, r in enumerate(res)})
        meta.update({ks[j]: m for j, m in enumerate(mt)})
        diag.update({ks[j]: d for j, d in dg.items()})
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (results, meta, diag))
        results, meta, diag = {}, {}, {}
        for res, mt, dg in gathered:
            results.update(res)
            meta.update(mt)
            diag.update(dg)
    n = len(items)
    return [results[k] for k in range(n)], [meta[k] for k in range(n)], [diag.get(k) for k in range(n)]


# -------------------------------------------------------------------------------------------------
# per-item token-set sums and exact matches (what the statistics resample)


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
