"""
The markdown table scripts/mc_eval.py prints and puts in the report, from the JSON document that
mc/eval/report.summarize builds. Pure formatting: every number comes from the result dict.

Layout: one column per condition that ran; rows
- per documents token set: NLL, R (vs RECENCY), R_eq (vs RECENCY-EQ) and R_eq-focus (vs RECENCY-EQ-FOCUS),
  the reference columns printed "1 (ref)" (FULL) and "0 (ref)"; then the documents' mean WC entries;
- exact-match rows per block (documents' recalls, each probe length, associative recall, tasks), each
  block followed by its mean WC entries;
- notes: validity verdicts, MC-LensNet refocus statistics, CI comparisons, the GistNet diagnostic.
Every figure its validity verdict does not cover carries NOT_COVERED in its row label (mc/eval/report.py
"Coverage"); a long-range R on a run that is not valid is not printed at all (NOT VALID in its cells).
"""

NOT_COVERED = "(not covered by validity)"
# JSON key of a gap recovery -> (row label prefix, reference condition printed "0 (ref)")
R_ROWS = {"gap_recovery": ("R", "RECENCY"), "gap_recovery_eq": ("R_eq", "RECENCY-EQ"),
          "gap_recovery_eq_focus": ("R_eq-focus", "RECENCY-EQ-FOCUS")}


def _f(d, key="value", nd=3):
    if not d or d.get(key) is None:
        return "–"
    s = f"{d[key]:.{nd}f}"
    return s + (f" [{d['lo']:.{nd}f}, {d['hi']:.{nd}f}]" if d.get("lo") is not None else "")


def _row(label, cells):
    return f"| {label} | " + " | ".join(cells) + " |"


def _mark(label: str, covered: bool) -> str:
    return label if covered else f"{label} {NOT_COVERED}"


def _entries_row(label, ent, conds):
    return _row(label, [f"{ent[c]:.0f}" if c in ent else "–" for c in conds])


def _r_cells(s, key, ref, conds, missing, suppressed):
    """Cells of one gap-recovery row; suppressed: the long-range R of a run that is not valid."""
    rec = s.get(key) or s.get(f"{key}_unvalidated") or {}
    cells = []
    for c in conds:
        if c in ("FULL", ref):
            cells.append("1 (ref)" if c == "FULL" else "0 (ref)")
        elif c in missing:
            cells.append("n/a")
        elif suppressed:
            cells.append("NOT VALID")
        else:
            cells.append(_f(rec.get(c), nd=2) if c in rec else "–")
    return cells


def nll_rows(result: dict, conds: list) -> list:
    """NLL and gap-recovery rows of the documents' token sets, then the documents' mean entries."""
    lines, valid, missing = [], result["valid"], result.get("not_available", {})
    names = {"horizon": "horizon", "boundary": f"boundary (first {result['settings']['boundary_tokens']})",
             "long_range": "long-range answers"}
    for name, s in result["nll"].items():
        if not s or not s["n_docs"]:
            continue
        covered = s.get("covered_by_validity", valid)
        lines.append(_row(_mark(f"NLL {names[name]} ({s['n_tokens']} tok, {s['n_docs']} docs)", covered),
                          [_f(s["nll"].get(c)) for c in conds]))
        if "FULL" not in s["nll"]:
            lines.append(_row(_mark(f"R {names[name]}", covered), ["– (FULL not run: no reference)"] * len(conds)))
            continue
        for key, (prefix, ref) in R_ROWS.items():
            if ref not in s["nll"]:
                continue  # the reference condition did not run (an older result)
            label = f"{prefix} {names[name]}" + ("" if key == "gap_recovery" else f" (vs {ref})")
            lines.append(_row(_mark(label, covered),
                              _r_cells(s, key, ref, conds, missing, name == "long_range" and not valid)))
    if result.get("mean_wc_entries"):
        lines.append(_entries_row("mean WC entries (docs)", result["mean_wc_entries"], conds))
    return lines


def _em_rows(label, p, with_fact):
    rows = [(f"{label} (n={p['n']})", p["all"])]
    if with_fact:
        rows += [("  passkey", p["by_fact"].get("passkey")), ("  key-value", p["by_fact"].get("kv"))]
    rows += [("  value straddles a block", p["straddling"]), ("  value inside a block", p["not_straddling"])]
    return rows


def em_rows(result: dict, conds: list) -> list:
    """Exact-match rows per block, each block's rows marked when its verdict does not cover them, and the
    block's mean WC entries after them."""
    missing, cov = result.get("not_available", {}), result.get("covered_by_validity", {})
    blocks = [([("doc recall EM (long-range)", result.get("doc_recalls"))], cov.get("doc_recalls", True), None)]
    for m, p in result.get("probes", {}).items():
        blocks.append((_em_rows(f"probe EM @{m} ({p['history_tokens']} tok)", p, True), p["covered_by_validity"],
                       p["mean_wc_entries"]))
    a = result.get("assoc")
    if a:
        blocks.append((_em_rows(f"assoc recall EM ({a.get('history_tokens')} tok, {a.get('pairs')} pairs)", a, False),
                       a["covered_by_validity"], a["mean_wc_entries"]))
    if result.get("tasks"):
        blocks.append(([("task EM", result["tasks"])], cov.get("tasks", False), result.get("tasks_mean_wc_entries")))
    lines = []
    for rows, covered, entries in blocks:
        for label, em in rows:
            if not em:
                continue
            n = max((v["n_answers"] for v in em.values()), default=0)
            lines.append(_row(_mark(label if "(n=" in label else f"{label} (n={n})", covered),
                              ["n/a" if c in missing else _f(em.get(c), nd=2) for c in conds]))
        if entries:
            lines.append(_entries_row("  mean WC entries", entries, conds))
    return lines


def notes(result: dict) -> str:
    """The lines under the table: availability, verdicts, refocus statistics, comparisons, diagnostic."""
    out, valid, a = "", result["valid"], result.get("assoc")
    for c, why in result.get("not_available", {}).items():
        out += f"\n\n{c}: not available: {why}."
    checks = result["validity_checks"]
    if valid:
        out += "\n\nLong-range result: valid (FULL shows the skill: " \
               f"EM {checks['full_exact_match']:.2f}, FULL-RECENCY gap {checks['full_recency_gap_long_range']:.3f} nats)."
    else:
        em = checks["full_exact_match"]
        out += "\n\n**Long-range result NOT VALID** — " + "; ".join(result["validity_reasons"]) + "." + \
            (" The exact-match rows measure a model that cannot recall with everything in view: they are not "
             "evidence for or against MC." if em is None or em < checks["min_full_exact_match"] else "")
    blocks = [(f"Probes @{m}", p) for m, p in result.get("probes", {}).items()] + ([("Associative recall", a)] if a else [])
    for label, p in blocks:
        out += f"\n{label}: " + ("valid" if p["valid"] else "NOT VALID") + f" — {p['validity']}."
    if result.get("tasks"):
        out += "\nTasks: " + ("valid" if result["tasks_valid"] else "NOT VALID") + f" — {result['tasks_validity']}."
    if not all(result.get("covered_by_validity", {}).values()):
        out += (f"\nRows marked {NOT_COVERED}: no passing validity verdict vouches for them (the documents' "
                "verdict covers the NLL, R and recall rows of the documents; each probe length, associative recall "
                "and the tasks have their own; the GistNet diagnostic has none).")
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
        out += (f"\n\nGistNet diagnostic {NOT_COVERED} ({d['n_docs']} docs; NLL of the "
                f"{result['settings']['boundary_tokens']} tokens after the block before the cut; ΔNLL vs the block "
                f"raw, {d['nll']['raw']['value']:.3f}): " + ", ".join(f"{k} {_f(v)}" for k, v in d["delta_vs_raw"].items()))
    return out


def table(result: dict, conds: list) -> str:
    lines = [_row("metric", conds), "|" + "---|" * (len(conds) + 1)]
    return "\n".join(lines + nll_rows(result, conds) + em_rows(result, conds)) + notes(result)
