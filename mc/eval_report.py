"""
From per-item measurements to the numbers scripts/mc_eval.py reports: statistics, validity, the JSON
document, the markdown table. Pure Python/numpy (no model).

Inputs (built by the script, one entry per item):
- documents: sets[d][set][cond] = (summed NLL, token count) for set in horizon | boundary | long_range;
  recalls[d][cond] = [exact match of each long-range recall]; diagnostic[d] = {variant: mean NLL} or None;
  meta[d] = {"entries": {cond: WC length}, "lens": MC-LensNet refocus stats or None}
- probes: {multiplier: [(EvalItem, {cond: [exact match]}, meta)]}; associative recall: [(EvalItem,
  {cond: [exact match]}, meta)]; tasks: [{cond: [exact match]}]
Every block reports the mean WC entries of each condition, so the focus budget is visibly matched
(MC-fixed = MC-LensNet's cap = ORACLE's whenever its needles fit in E).

Statistics (mc/stats.py): NLL is token-weighted within a set; CIs resample documents; gap recovery R is
computed per replicate from the same resampled documents for every condition. Exact match: the share
of answers reproduced exactly, weighted by answers per item, CIs resampling items.

Validity (the long-range claim counts only when the model has the skill with everything in view):
    (1) FULL exact match on in-context recalls >= 0.90: the probes at the smallest length FULL fits,
        else the documents' long-range recalls (all in FULL's context);
    (2) NLL_RECENCY - NLL_FULL >= 0.02 nats on the long-range token set (else there is nothing to recover).
If either fails, "valid" is false, "validity_reasons" says which and by how much, the long-range
gap_recovery becomes null (the computed numbers move to gap_recovery_unvalidated) and the table prints
NOT VALID in place of R. Probe blocks and the associative-recall block carry their own validity:
FULL's exact match on that task >= 0.90 (for a length FULL cannot run, FULL's at the longest shorter
length of the same task; none: not valid, the skill is unknown).

Comparisons: "MC-LensNet vs MC-fixed" and "MC-LensNet vs MEANPOOL", per metric (R per token set, EM
per probe length and associative recall): whether the two 95% CIs overlap (mc/stats.ci_overlap).
"""

import numpy as np

from mc.eval_conditions import CONDITIONS
from mc.stats import bootstrap_ci, ci_overlap, paired_bootstrap

SETS = ("horizon", "boundary", "long_range")
MIN_FULL_EM = 0.90
MIN_GAP_NATS = 0.02
SCHEMA = "mc_eval/v2"
COMPARE = (("MC-LensNet", "MC-fixed"), ("MC-LensNet", "MEANPOOL"))


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
                                   [s[name][conds[0]][1] for s in sets], n_boot, seed) for name in SETS}


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
    item.info["straddle"] (the value's tokens cross a block boundary, mc/eval_conditions.straddles)."""
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
            cmp[f"R {name}"] = "n/a (no R: FULL not run or no FULL-RECENCY gap)" if ov is None else \
                ("overlap" if ov else "no overlap")
        blocks = [(f"probe EM {m}", p) for m, p in result.get("probes", {}).items()]
        if result.get("assoc"):
            blocks.append(("assoc EM", result["assoc"]))
        for label, p in blocks:
            ov = ci_overlap(p["all"].get(a), p["all"].get(b))
            cmp[label] = ("n/a" if ov is None else "overlap" if ov else "no overlap") + \
                ("" if p["valid"] else " (NOT VALID)")
        out[key] = cmp
    return out


# ------------------------------------------------------------------ formatting
def _f(d, key="value", nd=3):
    if not d or d.get(key) is None:
        return "–"
    s = f"{d[key]:.{nd}f}"
    return s + (f" [{d['lo']:.{nd}f}, {d['hi']:.{nd}f}]" if d.get("lo") is not None else "")


def _row(label, cells):
    return f"| {label} | " + " | ".join(cells) + " |"




def _em_rows(label, p, with_fact):
    rows = [(f"{label} (n={p['n']})", p["all"])]
    if with_fact:
        rows += [("  passkey", p["by_fact"].get("passkey")), ("  key-value", p["by_fact"].get("kv"))]
    rows += [("  value straddles a block", p["straddling"]), ("  value inside a block", p["not_straddling"])]
    return rows


def table(result: dict, conds: list) -> str:
    lines = [_row("metric", conds), "|" + "---|" * (len(conds) + 1)]
    nll, valid = result["nll"], result["valid"]
    missing = result.get("not_available", {})
    names = {"horizon": "horizon", "boundary": f"boundary (first {result['settings']['boundary_tokens']})",
             "long_range": "long-range answers"}
    for name in SETS:
        s = nll.get(name)
        if not s or not s["n_docs"]:
            continue
        lines.append(_row(f"NLL {names[name]} ({s['n_tokens']} tok, {s['n_docs']} docs)",
                          [_f(s["nll"].get(c)) for c in conds]))
        if "FULL" not in s["nll"]:
            lines.append(_row(f"R {names[name]}", ["– (FULL not run: no reference)"] * len(conds)))
            continue
        rec = s.get("gap_recovery") or s.get("gap_recovery_unvalidated") or {}
        cells = []
        for c in conds:
            if c in ("FULL", "RECENCY"):
                cells.append("1 (ref)" if c == "FULL" else "0 (ref)")
            elif c in missing:
                cells.append("n/a")
            elif name == "long_range" and not valid:
                cells.append("NOT VALID")
            else:
                cells.append(_f(rec.get(c), nd=2) if c in rec else "–")
        lines.append(_row(f"R {names[name]}", cells))
    em_rows = [("doc recall EM (long-range)", result.get("doc_recalls"))]
    for m, p in result.get("probes", {}).items():
        em_rows += _em_rows(f"probe EM @{m} ({p['history_tokens']} tok)", p, True)
        em_rows.append(("  mean WC entries", p["mean_wc_entries"]))
    a = result.get("assoc")
    if a:
        em_rows += _em_rows(f"assoc recall EM ({a.get('history_tokens')} tok, {a.get('pairs')} pairs)", a, False)
        em_rows.append(("  mean WC entries", a["mean_wc_entries"]))
    if result.get("tasks"):
        em_rows.append(("task EM", result["tasks"]))
    for label, em in em_rows:
        if not em:
            continue
        if label.endswith("entries"):
            lines.append(_row(label, [f"{em[c]:.0f}" if c in em else "–" for c in conds]))
            continue
        n = max((v["n_answers"] for v in em.values()), default=0)
        lines.append(_row(label if "(n=" in label else f"{label} (n={n})",
                          ["n/a" if c in missing else _f(em.get(c), nd=2) for c in conds]))
    ent = result.get("mean_wc_entries", {})
    if ent:
        lines.append(_row("mean WC entries (docs)", [f"{ent[c]:.0f}" if c in ent else "–" for c in conds]))
    out = "\n".join(lines)
    for c, why in missing.items():
        out += f"\n\n{c}: not available: {why}."
    if valid:
        out += "\n\nLong-range result: valid (FULL shows the skill: " \
               f"EM {result['validity_checks']['full_exact_match']:.2f}, FULL-RECENCY gap " \
               f"{result['validity_checks']['full_recency_gap_long_range']:.3f} nats)."
    else:
        em = result["validity_checks"]["full_exact_match"]
        out += "\n\n**Long-range result NOT VALID** — " + "; ".join(result["validity_reasons"]) + "." + \
            (" The exact-match rows measure a model that cannot recall with everything in view: they are not "
             "evidence for or against MC." if em is None or em < MIN_FULL_EM else "")
    blocks = [(f"Probes @{m}", p) for m, p in result.get("probes", {}).items()] + ([("Associative recall", a)] if a else [])
    for label, p in blocks:
        out += f"\n{label}: " + ("valid" if p["valid"] else "NOT VALID") + f" — {p['validity']}."
    for label, p in [("docs", {"lensnet_focus": result.get("lensnet_focus")})] + blocks:
        f = p.get("lensnet_focus")
        if f:
            out += (f"\nMC-LensNet refocus ({label}): plan changed in {100 * f['frac_changed']:.0f}% of {f['n']} items, "
                    f"{f['mean_expands']:.2f} expands / item, mean |score| of the gists {f['score_abs_mean']:.3f}, "
                    f"mean max score {f['score_max_mean']:.3f}.")
    focus = [p.get("lensnet_focus") for _, p in [("", {"lensnet_focus": result.get("lensnet_focus")})] + blocks]
    focus = [f for f in focus if f]
    if focus and all(f["frac_changed"] == 0 for f in focus):
        out += ("\nMC-LensNet made no edit in any item (no gist scored >= the expand threshold): here it reads "
                "exactly MC's covering, and its numbers equal MC's.")
    note = (result["settings"].get("lensnet") or {}).get("note")
    if note:
        out += f"\nNote: {note}."
    for key, cmp in result.get("comparisons", {}).items():
        words = lambda v: "CIs " + v.replace("no overlap", "do not overlap") if v.startswith(("overlap", "no ")) else v
        out += f"\n{key}: " + "; ".join(f"{m}: {words(v)}" for m, v in cmp.items()) + "."
    d = result.get("gistnet_diagnostic")
    if d:
        out += (f"\n\nGistNet diagnostic ({d['n_docs']} docs; NLL of the {result['settings']['boundary_tokens']} "
                f"tokens after the block before the cut; ΔNLL vs the block raw, {d['nll']['raw']['value']:.3f}): "
                + ", ".join(f"{k} {_f(v)}" for k, v in d["delta_vs_raw"].items()))
    return out


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
        if not valid:
            lr["gap_recovery_unvalidated"], lr["gap_recovery"] = lr.pop("gap_recovery", {}), None
    lens = settings.get("lensnet") or {}
    missing = {} if lens.get("available", True) else {"MC-LensNet": lens.get("reason")}
    result = {"schema": SCHEMA, "settings": settings, "valid": valid, "validity_reasons": reasons,
              "validity_checks": checks, "conditions": list(CONDITIONS), "not_available": missing, "nll": nll,
              "doc_recalls": doc_em, "probes": probes, "assoc": assoc,
              "tasks": em_stats(task_stats, n_boot, seed) if task_stats else None,
              "gistnet_diagnostic": diagnostic_stats(doc_stats["diagnostic"], n_boot, seed),
              "mean_wc_entries": mean_entries(doc_stats.get("meta", [])),
              "lensnet_focus": lens_focus(doc_stats.get("meta", []))}
    if task_meta:
        result["tasks_mean_wc_entries"] = mean_entries(task_meta)
    result["comparisons"] = comparisons(result)
    seen = set(result["mean_wc_entries"]) | set(result["tasks"] or {}) | set(missing)
    for p in list(probes.values()) + ([assoc] if assoc else []):
        seen |= set(p["all"])
    conds = [c for c in CONDITIONS if c in seen]
    md = table(result, conds)
    hor = (nll.get("horizon") or {}).get("gap_recovery") or {}
    first = next(iter(probes.values()), None)
    summary = {"gists": settings["gists"], "valid": valid, "validity": "ok" if valid else "; ".join(reasons),
               "gap recovery": ((lr or {}).get("gap_recovery") or {}).get("MC", {}).get("value") if valid else "NOT VALID",
               "gap recovery horizon": hor.get("MC", {}).get("value"),
               "gap recovery horizon MC-fixed": hor.get("MC-fixed", {}).get("value"),
               "gap recovery horizon MC-LensNet": hor.get("MC-LensNet", {}).get("value") if not missing else
               "not available: " + missing["MC-LensNet"],
               "gap recovery boundary": ((nll.get("boundary") or {}).get("gap_recovery") or {}).get("MC", {}).get("value"),
               "passkey accuracy": (first or {}).get("all", {}).get("MC", {}).get("value"),
               "passkey accuracy FULL": (first or {}).get("all", {}).get("FULL", {}).get("value"),
               "assoc accuracy FULL": ((assoc or {}).get("all", {}).get("FULL") or {}).get("value"),
               "assoc accuracy MC-LensNet": ((assoc or {}).get("all", {}).get("MC-LensNet") or {}).get("value")}
    return result, md, summary
