"""
From per-item measurements to the numbers scripts/mc_eval.py reports: statistics, validity, the JSON
document (the markdown table is mc/eval/table.py). Pure Python/numpy (no model).

Inputs (built by the script, one entry per item):
- documents: sets[d][set][cond] = (summed NLL, token count) for set in horizon | boundary | long_range;
  recalls[d][cond] = [exact match of each long-range recall]; diagnostic[d] = {variant: mean NLL} or None;
  meta[d] = {"entries": {cond: WC length}, "lens": MC-LensNet refocus stats or None}
- probes: {multiplier: [(EvalItem, {cond: [exact match]}, meta)]}; associative recall: [(EvalItem,
  {cond: [exact match]}, meta)]; tasks: [{cond: [exact match]}]
Every block (documents, each probe length, associative recall, tasks) reports the mean WC entries of
every condition that ran in it (FULL = T, RECENCY = W, RECENCY-EQ = MC, RECENCY-EQ-FOCUS = MC-fixed), so
the budgets are visibly matched (MC-fixed = MC-KEYMATCH's and MC-LensNet's cap = ORACLE's whenever its
needles fit in E).

Statistics (mc/eval/stats.py): NLL is token-weighted within a set; CIs resample documents; gap recovery is
computed per replicate from the same resampled documents for every condition, against three references
(REFERENCES): "gap_recovery" R vs RECENCY (the last W raw tokens), "gap_recovery_eq" R_eq vs RECENCY-EQ
(the last n raw tokens, n = MC's entries: equal entries for MEANPOOL / MC / SHUFFLED) and
"gap_recovery_eq_focus" vs RECENCY-EQ-FOCUS (n = MC-fixed's entries: equal entries for the focus
conditions). Exact match: the share of answers reproduced exactly, weighted by answers per item, CIs
resampling items.

Validity (the long-range claim counts only when the model has the skill with everything in view):
    (1) FULL exact match on in-context recalls >= 0.90: the probes at the smallest length FULL fits,
        else the documents' long-range recalls (all in FULL's context);
    (2) NLL_RECENCY - NLL_FULL >= 0.02 nats on the long-range token set (else there is nothing to recover).
If either fails, "valid" is false, "validity_reasons" says which and by how much, the long-range
gap recoveries become null (the computed numbers move to <key>_unvalidated) and the table prints
NOT VALID in place of R. Probe blocks, the associative-recall block and the tasks carry their own
validity: FULL's exact match on that task >= 0.90 (for a length FULL cannot run, FULL's at the longest
shorter length of the same task; none: not valid, the skill is unknown).

Coverage (which verdict vouches for which figure; validity_coverage). A figure is covered by validity
when the verdict of its block passed: the documents' verdict ("valid") covers every documents figure
(NLL and every R on horizon, boundary and long_range, and the documents' recall EM); each probe length,
the associative-recall block and the tasks are covered by their own verdict; the GistNet diagnostic
has no verdict (a mechanism check, not a quality claim) and is never covered. The JSON says so per
figure ("covered_by_validity" in each nll set, probe block and the assoc block, and the map
"covered_by_validity" {figure: bool}); the table marks every uncovered figure NOT_COVERED. Entry counts
are budgets, not results, and carry no mark.

Comparisons (COMPARE): learned focus vs recency, vs no learning and vs the parameter-free scorer, and
that scorer vs recency, per metric (R per token set, EM per probe length and associative recall):
whether the two 95% CIs overlap (mc/stats.ci_overlap); a metric its verdict does not cover is tagged.
"""

import numpy as np

from mc.eval.conditions import CONDITIONS, REFERENCES
from mc.eval.stats import bootstrap_ci, ci_overlap, paired_bootstrap
from mc.eval.table import NOT_COVERED, table

SETS = ("horizon", "boundary", "long_range")
MIN_FULL_EM = 0.90
MIN_GAP_NATS = 0.02
SCHEMA = "mc_eval/v2"
COMPARE = (("MC-LensNet", "MC-fixed"), ("MC-LensNet", "MEANPOOL"), ("MC-LensNet", "MC-KEYMATCH"),
           ("MC-KEYMATCH", "MC-fixed"))


def em_stats(per_item: list, n_boot: int, seed: int) -> dict:
    """{cond: {"value", "lo", "hi", "n_docs", "n_answers"}} over items [{cond: [bool, ...]}]."""
    conds = [c for c in CONDITIONS if per_item and all(c in r for r in per_item)]
    out = {}
    for c in conds:
        n = np.array([len(r[c]) for r in per_item], dtype=np.float64)
        hits = np.array([sum(r[c]) for r in per_item], dtype=np.float64)
        if n.sum() == 0:
            continue
        v = np.divide(hits, n, out=np.zeros_like(hits), where=n > 0)
        out[c] = {**bootstrap_ci(v, n_boot, seed, weights=n), "n_answers": int(n.sum())}
    return out


def nll_stats(sets: list, n_boot: int, seed: int) -> dict:
    """{set: paired_bootstrap(...)} over the conditions every document has."""
    if not sets:
        return {}
    conds = [c for c in CONDITIONS if all(c in s["horizon"] for s in sets)]
    return {name: paired_bootstrap({c: [s[name][c][0] for s in sets] for c in conds},
                                   [s[name][conds[0]][1] for s in sets], n_boot, seed, references=REFERENCES)
            for name in SETS}


def diagnostic_stats(diag: list, n_boot: int, seed: int) -> dict | None:
    rows = [d for d in diag if d]
    if not rows:
        return None
    out = {"n_docs": len(rows), "nll": {}, "delta_vs_raw": {}}
    for name in ("raw", "gist", "meanpool", "dropped"):
        v = np.array([d[name] for d in rows])
        out["nll"][name] = bootstrap_ci(v, n_boot, seed)
        if name != "raw":
            out["delta_vs_raw"][name] = bootstrap_ci(v - np.array([d["raw"] for d in rows]), n_boot, seed)
    return out


def validity(nll: dict, doc_em: dict, probe_em: dict) -> tuple[bool, list, dict]:
    reasons, checks = [], {"min_full_exact_match": MIN_FULL_EM, "min_full_recency_gap_nats": MIN_GAP_NATS}
    em, where = None, None
    for m in sorted(probe_em):
        if "FULL" in probe_em[m]["all"]:
            em, where = probe_em[m]["all"]["FULL"]["value"], f"probes at {m}xW"
            break
    if em is None and "FULL" in doc_em:
        em, where = doc_em["FULL"]["value"], "documents' long-range recalls"
    checks.update(full_exact_match=em, full_exact_match_on=where)
    if em is None:
        reasons.append("FULL was not scored on any recall (no probes or document recalls that fit sequence_len), "
                       "so the model's recall skill is unknown")
    elif em < MIN_FULL_EM:
        reasons.append(f"FULL exact match on in-context recalls ({where}) is {em:.2f} < {MIN_FULL_EM:.2f}: "
                       f"the model cannot recall even with everything in view")
    lr = nll.get("long_range", {})
    gap = None
    if not lr or lr.get("n_tokens", 0) == 0:
        reasons.append("no long-range answer tokens (recalls in the horizon whose source lies before the cut); "
                       "use synthetic documents with --doc_tokens well above --wc_length")
    elif "FULL" not in lr["nll"]:
        reasons.append("FULL was not run on the documents (doc_tokens > sequence_len), so the FULL-RECENCY gap "
                       "is unknown; use --doc_tokens <= sequence_len")
    else:
        gap = lr["nll"]["RECENCY"]["value"] - lr["nll"]["FULL"]["value"]
        if gap < MIN_GAP_NATS:
            reasons.append(f"FULL-RECENCY gap on long-range tokens is {gap:.4f} < {MIN_GAP_NATS} nats: "
                           f"full attention gains nothing there, so there is nothing to recover")
    checks["full_recency_gap_long_range"] = gap
    return not reasons, reasons, checks


# ------------------------------------------------------------------ per-block pieces
def mean_entries(metas: list) -> dict:
    """{cond: mean WC entries} over items' meta["entries"]."""
    out = {}
    for c in CONDITIONS:
        v = [m["entries"][c] for m in metas if m and c in m["entries"]]
        if v:
            out[c] = float(np.mean(v))
    return out


def lens_focus(metas: list) -> dict | None:
    """MC-LensNet refocus statistics over items: how often the plan changed, mean expands, mean and max
    LensNet score of the covering's gists (0 everywhere = an untrained head: MC-LensNet = MC)."""
    rows = [m["lens"] for m in metas if m and m.get("lens")]
    if not rows:
        return None
    return {"n": len(rows), "frac_changed": float(np.mean([r["changed"] for r in rows])),
            "mean_expands": float(np.mean([r["expands"] for r in rows])),
            "mean_collapses": float(np.mean([r["collapses"] for r in rows])),
            "score_abs_mean": float(np.mean([r["score_abs_mean"] for r in rows])),
            "score_max_mean": float(np.mean([r["score_max"] for r in rows]))}


def straddle_split(rows: list, n_boot: int, seed: int) -> dict:
    """{"straddling": EM, "not_straddling": EM} over rows (item, {cond: [bool]}, ...) grouped by
    item.info["straddle"] (the value's tokens cross a block boundary, mc/eval/conditions.straddles)."""
    return {"straddling": em_stats([r[1] for r in rows if r[0].info["straddle"]], n_boot, seed),
            "not_straddling": em_stats([r[1] for r in rows if not r[0].info["straddle"]], n_boot, seed)}


def task_validity(full_em: float | None, where: str) -> tuple[bool, str]:
    """(valid, reason) for one task block from FULL's exact match on it (or on a shorter length)."""
    if full_em is None:
        return False, "FULL could not be run at any length of this task (history > sequence_len): its skill is unknown"
    if full_em < MIN_FULL_EM:
        return False, f"FULL exact match {full_em:.2f} < {MIN_FULL_EM:.2f} ({where}): the model cannot do the task " \
                      f"even with everything in view"
    return True, f"FULL exact match {full_em:.2f} ({where})"


def probe_blocks(probe_stats: dict, n_boot: int, seed: int) -> dict:
    """{"<m>xW": block} per multiplier, with validity from FULL at that length or the longest shorter one."""
    out, full_seen = {}, None
    for m in sorted(probe_stats):
        rows = probe_stats[m]
        pick = lambda f: em_stats([r[1] for r in rows if f(r[0])], n_boot, seed)
        block = {"history_tokens": rows[0][0].T if rows else None, "n": len(rows),
                 "all": em_stats([r[1] for r in rows], n_boot, seed),
                 "by_fact": {k: pick(lambda it, k=k: it.info["fact"] == k) for k in ("passkey", "kv")},
                 **straddle_split(rows, n_boot, seed),
                 "mean_wc_entries": mean_entries([r[2] for r in rows]),
                 "lensnet_focus": lens_focus([r[2] for r in rows])}
        if "FULL" in block["all"]:
            full_seen = (block["all"]["FULL"]["value"], f"probes at {m}xW")
        elif full_seen is not None:
            full_seen = (full_seen[0], full_seen[1] + f"; FULL cannot run at {m}xW")
        block["valid"], block["validity"] = task_validity(*(full_seen or (None, "")))
        out[f"{m}xW"] = block
    return out


def assoc_block(assoc_stats: list, settings: dict, n_boot: int, seed: int) -> dict | None:
    if not assoc_stats:
        return None
    recs = [r[1] for r in assoc_stats]
    nq = max(r[0].info["query"] for r in assoc_stats) + 1
    block = {**(settings.get("assoc") or {}), "n": len(assoc_stats), "all": em_stats(recs, n_boot, seed),
             **straddle_split(assoc_stats, n_boot, seed),
             "by_query": {str(k + 1): em_stats([r[1] for r in assoc_stats if r[0].info["query"] == k], n_boot, seed)
                          for k in range(nq)},
             "mean_wc_entries": mean_entries([r[2] for r in assoc_stats]),
             "lensnet_focus": lens_focus([r[2] for r in assoc_stats])}
    full = block["all"].get("FULL")
    block["valid"], block["validity"] = task_validity(full["value"] if full else None, "associative recall")
    return block


def comparisons(result: dict) -> dict:
    """{"A vs B": {metric: "overlap" | "no overlap" | "n/a ..." | "not available: ..."}} (module docstring)."""
    out = {}
    missing = result.get("not_available", {})
    for a, b in COMPARE:
        key = f"{a} vs {b}"
        if a in missing or b in missing:
            out[key] = {"all": f"not available: {missing.get(a) or missing.get(b)}"}
            continue
        cmp = {}
        for name in SETS:
            s = result["nll"].get(name)
            if not s or not s.get("n_docs"):
                continue
            if name == "long_range" and not result["valid"]:
                cmp["R long_range"] = "NOT VALID"
                continue
            gr = s.get("gap_recovery") or {}
            ov = ci_overlap(gr.get(a), gr.get(b))
            cmp[f"R {name}"] = ("n/a (no R: FULL not run or no FULL-RECENCY gap)" if ov is None else
                                "overlap" if ov else "no overlap") + ("" if s["covered_by_validity"] else " " + NOT_COVERED)
        blocks = [(f"probe EM {m}", p) for m, p in result.get("probes", {}).items()]
        if result.get("assoc"):
            blocks.append(("assoc EM", result["assoc"]))
        for label, p in blocks:
            ov = ci_overlap(p["all"].get(a), p["all"].get(b))
            cmp[label] = ("n/a" if ov is None else "overlap" if ov else "no overlap") + \
                ("" if p["covered_by_validity"] else " " + NOT_COVERED)
        out[key] = cmp
    return out


def validity_coverage(result: dict) -> dict:
    """{figure: covered} (module docstring, "Coverage"); also writes "covered_by_validity" into each nll
    set, probe block and the assoc block."""
    cov = {}
    for name, s in result["nll"].items():
        s["covered_by_validity"] = cov[f"nll.{name}"] = result["valid"]
    if result.get("doc_recalls"):
        cov["doc_recalls"] = result["valid"]
    for m, p in result.get("probes", {}).items():
        p["covered_by_validity"] = cov[f"probes.{m}"] = p["valid"]
    if result.get("assoc"):
        result["assoc"]["covered_by_validity"] = cov["assoc"] = result["assoc"]["valid"]
    if result.get("tasks"):
        cov["tasks"] = result["tasks_valid"]
    if result.get("gistnet_diagnostic"):
        cov["gistnet_diagnostic"] = False
    return cov


def summarize(settings, doc_stats, probe_stats, task_stats, n_boot, seed, assoc_stats=None, task_meta=None):
    """-> (JSON-ready result, markdown table, summary dict for the run report)."""
    nll = nll_stats(doc_stats["sets"], n_boot, seed)
    doc_em = em_stats(doc_stats["recalls"], n_boot, seed)
    probes = probe_blocks(probe_stats, n_boot, seed)
    assoc = assoc_block(assoc_stats or [], settings, n_boot, seed)
    valid, reasons, checks = validity(nll, doc_em, {int(k[:-2]): v for k, v in probes.items()})
    lr = nll.get("long_range")
    if lr is not None:
        lr["valid"] = valid
        if not valid:  # no long-range R number outside the *_unvalidated keys
            for key in REFERENCES:
                lr[f"{key}_unvalidated"], lr[key] = lr.pop(key, {}), None
    lens = settings.get("lensnet") or {}
    missing = {} if lens.get("available", True) else {"MC-LensNet": lens.get("reason")}
    tasks = em_stats(task_stats, n_boot, seed) if task_stats else None
    result = {"schema": SCHEMA, "settings": settings, "valid": valid, "validity_reasons": reasons,
              "validity_checks": checks, "conditions": list(CONDITIONS), "not_available": missing, "nll": nll,
              "doc_recalls": doc_em, "probes": probes, "assoc": assoc, "tasks": tasks,
              "gistnet_diagnostic": diagnostic_stats(doc_stats["diagnostic"], n_boot, seed),
              "mean_wc_entries": mean_entries(doc_stats.get("meta", [])),
              "lensnet_focus": lens_focus(doc_stats.get("meta", []))}
    if tasks:
        full = tasks.get("FULL")
        result["tasks_valid"], result["tasks_validity"] = task_validity(full["value"] if full else None, "tasks")
        result["tasks_mean_wc_entries"] = mean_entries(task_meta or [])
    result["covered_by_validity"] = validity_coverage(result)
    result["comparisons"] = comparisons(result)
    seen = set(result["mean_wc_entries"]) | set(result["tasks"] or {}) | set(missing)
    for p in list(probes.values()) + ([assoc] if assoc else []):
        seen |= set(p["all"])
    conds = [c for c in CONDITIONS if c in seen]
    md = table(result, conds)
    hor = (nll.get("horizon") or {}).get("gap_recovery") or {}
    hor_eq = (nll.get("horizon") or {}).get("gap_recovery_eq") or {}
    first = next(iter(probes.values()), None)
    summary = {"gists": settings["gists"], "valid": valid, "validity": "ok" if valid else "; ".join(reasons),
               "not covered by validity": ", ".join(k for k, v in result["covered_by_validity"].items() if not v)
               or "none",
               "gap recovery": ((lr or {}).get("gap_recovery") or {}).get("MC", {}).get("value") if valid else "NOT VALID",
               "gap recovery horizon": hor.get("MC", {}).get("value"),
               "gap recovery horizon vs RECENCY-EQ": hor_eq.get("MC", {}).get("value"),
               "gap recovery horizon MC-KEYMATCH": hor.get("MC-KEYMATCH", {}).get("value"),
               "gap recovery horizon MC-fixed": hor.get("MC-fixed", {}).get("value"),
               "gap recovery horizon MC-LensNet": hor.get("MC-LensNet", {}).get("value") if not missing else
               "not available: " + missing["MC-LensNet"],
               "gap recovery boundary": ((nll.get("boundary") or {}).get("gap_recovery") or {}).get("MC", {}).get("value"),
               "passkey accuracy": (first or {}).get("all", {}).get("MC", {}).get("value"),
               "passkey accuracy FULL": (first or {}).get("all", {}).get("FULL", {}).get("value"),
               "assoc accuracy FULL": ((assoc or {}).get("all", {}).get("FULL") or {}).get("value"),
               "assoc accuracy MC-LensNet": ((assoc or {}).get("all", {}).get("MC-LensNet") or {}).get("value")}
    return result, md, summary
