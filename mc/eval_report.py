"""
From per-item measurements to the numbers scripts/mc_eval.py reports: statistics, validity, the JSON
document, the markdown table. Pure Python/numpy (no model).

Inputs (built by the script, one entry per item):
- documents: sets[d][set][cond] = (summed NLL, token count) for set in horizon | boundary | long_range;
  recalls[d][cond] = [exact match of each long-range recall]; diagnostic[d] = {variant: mean NLL} or None
- probes: {multiplier: [(EvalItem, {cond: [exact match]})]}; tasks: [{cond: [exact match]}]
- entries: {cond: [WC length of every document row]}

Statistics (mc/stats.py): NLL is token-weighted within a set; CIs resample documents; gap recovery R is
computed per replicate from the same resampled documents for every condition. Exact match: the share
of answers reproduced exactly, weighted by answers per item, CIs resampling items.

Validity (the long-range claim counts only when the model has the skill with everything in view):
    (1) FULL exact match on in-context recalls >= 0.90: the probes at the smallest length FULL fits,
        else the documents' long-range recalls (all in FULL's context);
    (2) NLL_RECENCY - NLL_FULL >= 0.02 nats on the long-range token set (else there is nothing to recover).
If either fails, "valid" is false, "validity_reasons" says which and by how much, the long-range
gap_recovery becomes null (the computed numbers move to gap_recovery_unvalidated) and the table prints
NOT VALID in place of R.
"""

import numpy as np

from mc.eval_conditions import CONDITIONS
from mc.stats import bootstrap_ci, paired_bootstrap

SETS = ("horizon", "boundary", "long_range")
MIN_FULL_EM = 0.90
MIN_GAP_NATS = 0.02
SCHEMA = "mc_eval/v1"


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


# ------------------------------------------------------------------ formatting
def _f(d, key="value", nd=3):
    if not d or d.get(key) is None:
        return "–"
    s = f"{d[key]:.{nd}f}"
    return s + (f" [{d['lo']:.{nd}f}, {d['hi']:.{nd}f}]" if d.get("lo") is not None else "")


def _row(label, cells):
    return f"| {label} | " + " | ".join(cells) + " |"


def table(result: dict, conds: list) -> str:
    lines = [_row("metric", conds), "|" + "---|" * (len(conds) + 1)]
    nll, valid = result["nll"], result["valid"]
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
            elif name == "long_range" and not valid:
                cells.append("NOT VALID")
            else:
                cells.append(_f(rec.get(c), nd=2) if c in rec else "–")
        lines.append(_row(f"R {names[name]}", cells))
    em_rows = [("doc recall EM (long-range)", result.get("doc_recalls"))]
    for m, p in result.get("probes", {}).items():
        em_rows += [(f"probe EM @{m} ({p['history_tokens']} tok)", p["all"]),
                    ("  passkey", p["by_fact"].get("passkey")), ("  key-value", p["by_fact"].get("kv")),
                    ("  needle straddles a block", p["straddling"]), ("  needle inside a block", p["not_straddling"])]
    if result.get("tasks"):
        em_rows.append(("task EM", result["tasks"]))
    for label, em in em_rows:
        if em:
            n = max((v["n_answers"] for v in em.values()), default=0)
            lines.append(_row(f"{label} (n={n})", [_f(em.get(c), nd=2) for c in conds]))
    ent = result.get("mean_wc_entries", {})
    if ent:
        lines.append(_row("mean WC entries (docs)", [f"{ent[c]:.0f}" if c in ent else "–" for c in conds]))
    out = "\n".join(lines)
    if valid:
        out += "\n\nLong-range result: valid (FULL shows the skill: " \
               f"EM {result['validity_checks']['full_exact_match']:.2f}, FULL-RECENCY gap " \
               f"{result['validity_checks']['full_recency_gap_long_range']:.3f} nats)."
    else:
        em = result["validity_checks"]["full_exact_match"]
        out += "\n\n**Long-range result NOT VALID** — " + "; ".join(result["validity_reasons"]) + "." + \
            (" The exact-match rows measure a model that cannot recall with everything in view: they are not "
             "evidence for or against MC." if em is None or em < MIN_FULL_EM else "")
    d = result.get("gistnet_diagnostic")
    if d:
        out += (f"\n\nGistNet diagnostic ({d['n_docs']} docs; NLL of the {result['settings']['boundary_tokens']} "
                f"tokens after the block before the cut; ΔNLL vs the block raw, {d['nll']['raw']['value']:.3f}): "
                + ", ".join(f"{k} {_f(v)}" for k, v in d["delta_vs_raw"].items()))
    return out


def summarize(settings, doc_stats, probe_stats, task_stats, entries, n_boot, seed):
    """-> (JSON-ready result, markdown table, summary dict for the run report)."""
    nll = nll_stats(doc_stats["sets"], n_boot, seed)
    doc_em = em_stats(doc_stats["recalls"], n_boot, seed)
    probes = {}
    for m, rows in probe_stats.items():
        recs = [r for _, r in rows]
        pick = lambda f: em_stats([r for it, r in rows if f(it)], n_boot, seed)
        probes[f"{m}xW"] = {"history_tokens": rows[0][0].T if rows else None, "n": len(rows),
                            "all": em_stats(recs, n_boot, seed),
                            "by_fact": {k: pick(lambda it, k=k: it.info["fact"] == k) for k in ("passkey", "kv")},
                            "straddling": pick(lambda it: it.info["straddle"]),
                            "not_straddling": pick(lambda it: not it.info["straddle"])}
    valid, reasons, checks = validity(nll, doc_em, {int(k[:-2]): v for k, v in probes.items()})
    lr = nll.get("long_range")
    if lr is not None:
        lr["valid"] = valid
        if not valid:
            lr["gap_recovery_unvalidated"], lr["gap_recovery"] = lr.pop("gap_recovery", {}), None
    result = {"schema": SCHEMA, "settings": settings, "valid": valid, "validity_reasons": reasons,
              "validity_checks": checks, "conditions": list(CONDITIONS), "nll": nll, "doc_recalls": doc_em,
              "probes": probes, "tasks": em_stats(task_stats, n_boot, seed) if task_stats else None,
              "gistnet_diagnostic": diagnostic_stats(doc_stats["diagnostic"], n_boot, seed),
              "mean_wc_entries": {c: float(np.mean(v)) for c, v in entries.items() if v}}
    conds = [c for c in CONDITIONS if c in result["mean_wc_entries"] or
             any(c in p["all"] for p in probes.values()) or c in (result["tasks"] or {})]
    md = table(result, conds)
    mc_r = (lr or {}).get("gap_recovery") or {}
    first = next(iter(probes.values()), None)
    summary = {"gists": settings["gists"], "valid": valid, "validity": "ok" if valid else "; ".join(reasons),
               "gap recovery": mc_r.get("MC", {}).get("value") if valid else "NOT VALID",
               "gap recovery horizon": ((nll.get("horizon") or {}).get("gap_recovery") or {}).get("MC", {}).get("value"),
               "gap recovery boundary": ((nll.get("boundary") or {}).get("gap_recovery") or {}).get("MC", {}).get("value"),
               "passkey accuracy": (first or {}).get("all", {}).get("MC", {}).get("value"),
               "passkey accuracy FULL": (first or {}).get("all", {}).get("FULL", {}).get("value")}
    return result, md, summary
