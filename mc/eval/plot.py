"""
The figure scripts/mc_eval.py writes next to its JSON (--plot): exact match against history length,
one line per condition (the same colour in every panel), one panel per task that has exact matches:
    needle probes      one point per length m x W (--probe_multipliers: 4xW and 16xW by default)
    associative recall  its one length (--assoc_multiplier x W)
    document recalls   the documents' long-range recalls at --doc_tokens
(--tasks rows have no common history length and are left out: their EM is in the table.) A last panel
shows the documents' gap recovery R = (NLL_RECENCY - NLL_cond) / (NLL_RECENCY - NLL_FULL) per condition
for the three windows (horizon, boundary, long-range answers), with its CIs. Error bars are
the bootstrap 95% CIs of the JSON; each condition's points sit slightly to the side of the true length
(a fixed dodge on the log axis) so that equal values do not hide each other. A point its validity verdict does not cover (mc/eval/report.py,
"Coverage") is drawn hollow, and the panel title says so, so the figure never shows more than the
verdicts allow. Conditions that did not run at a length (FULL past sequence_len) have no point there.
"""

from mc.eval.conditions import CONDITIONS


def em_panels(result: dict) -> list:
    """[(title, [(history tokens, {cond: EM dict}, covered)])] of the result's exact-match blocks, each
    panel's points sorted by history length; panels without points are left out."""
    panels = [("needle probes", [(p["history_tokens"], p["all"], p["covered_by_validity"])
                                 for p in result.get("probes", {}).values()])]
    a = result.get("assoc")
    if a:
        panels.append(("associative recall", [(a["history_tokens"], a["all"], a["covered_by_validity"])]))
    if result.get("doc_recalls"):
        panels.append(("document long-range recalls", [(result["settings"]["doc_tokens"], result["doc_recalls"],
                                                        result["covered_by_validity"].get("doc_recalls", False))]))
    return [(title, sorted(points, key=lambda p: p[0])) for title, points in panels if points]


R_WINDOWS = ("horizon", "boundary", "long_range")


def r_points(result: dict) -> list:
    """[(window, {cond: R dict}, covered)] of the documents' gap recovery, for the windows the result has."""
    nll = result.get("nll") or {}
    cover = result.get("covered_by_validity", {})
    return [(w, nll[w]["gap_recovery"], cover.get(f"nll.{w}", False)) for w in R_WINDOWS
            if w in nll and nll[w].get("gap_recovery")]


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); ImportError when it is not installed."""
    # matplotlib is slow to import and only needed to draw: a run without --plot never pays for it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_exact_match(result: dict, path: str) -> str | None:
    """Draw the figure (module docstring) to path; None when the result has no exact-match block.
    Raises ImportError when matplotlib is missing (the caller reports it)."""
    panels, rs = em_panels(result), r_points(result)
    if not panels:
        return None
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    n = len(panels) + bool(rs)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    handles = {}
    if rs:
        _r_panel(axes[0][-1], rs, cmap)
    for ax, (title, points) in zip(axes[0], panels):
        for i, cond in enumerate(CONDITIONS):
            pts = [(x, em[cond], covered) for x, em, covered in points if em.get(cond, {}).get("value") is not None]
            if not pts:
                continue
            color = cmap(i % 20)
            # dodge: each condition a little to the side of the true length, so equal values stay visible
            xs = [p[0] * 2 ** (0.03 * (i - len(CONDITIONS) / 2)) for p in pts]
            ys = [p[1]["value"] for p in pts]
            lo = [y - (p[1].get("lo") if p[1].get("lo") is not None else y) for y, p in zip(ys, pts)]
            hi = [(p[1].get("hi") if p[1].get("hi") is not None else y) - y for y, p in zip(ys, pts)]
            (line,) = ax.plot(xs, ys, color=color, alpha=0.8, label=cond)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor=color, alpha=0.4, capsize=3)
            for x, y, (_, _, covered) in zip(xs, ys, pts):
                ax.plot([x], [y], "o", color=color, markerfacecolor=color if covered else "none")
            handles.setdefault(cond, line)
        uncovered = [x for x, _, covered in points if not covered]
        ax.set_title(title + (f"\nhollow: not covered by validity ({', '.join(map(str, uncovered))} tok)"
                              if uncovered else ""), fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks([x for x, _, _ in points], [str(x) for x, _, _ in points])
        ax.minorticks_off()
        ax.set_xlabel("history length (tokens)")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    # (the R panel uses the same colour per condition, so the one legend serves it too)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _r_panel(ax, rs, cmap):
    """Gap recovery R per condition (colour as in the other panels) for each window, CIs as error bars;
    hollow where the window's validity verdict does not cover it."""
    for i, cond in enumerate(CONDITIONS):
        color = cmap(i % 20)
        for k, (window, r, covered) in enumerate(rs):
            v = r.get(cond, {})
            if v.get("value") is None:
                continue
            x = k + 0.8 * (i - len(CONDITIONS) / 2) / len(CONDITIONS)
            y = v["value"]
            lo = y - (v["lo"] if v.get("lo") is not None else y)
            hi = (v["hi"] if v.get("hi") is not None else y) - y
            ax.errorbar([x], [y], yerr=[[lo], [hi]], fmt="o", color=color, alpha=0.8, capsize=3,
                        markerfacecolor=color if covered else "none")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(rs)), [w.replace("_", "-") for w, _, _ in rs])
    ax.set_ylabel("gap recovery R (FULL = 1, RECENCY = 0)")
    uncovered = [w for w, _, covered in rs if not covered]
    ax.set_title("documents: R per window" + (f"\nhollow: not covered by validity ({', '.join(uncovered)})"
                                               if uncovered else ""), fontsize=10)
    ax.grid(alpha=0.3)
