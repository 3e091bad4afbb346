"""
The figure scripts/mc_eval.py writes next to its JSON (--plot): exact match against history length,
one line per condition (the same colour in every panel), one panel per task that has exact matches:
    needle probes      one point per length m x W (--probe_multipliers: 4xW and 16xW by default)
    associative recall  its one length (--assoc_multiplier x W)
    document recalls   the documents' long-range recalls at --doc_tokens
(--tasks rows have no common history length and are left out: their EM is in the table.) Error bars are
the bootstrap 95% CIs of the JSON; each condition's points sit slightly to the side of the true length
(a fixed dodge on the log axis) so that equal values do not hide each other. A point its validity verdict does not cover (mc/eval_report.py,
"Coverage") is drawn hollow, and the panel title says so, so the figure never shows more than the
verdicts allow. Conditions that did not run at a length (FULL past sequence_len) have no point there.
"""

from mc.eval_conditions import CONDITIONS


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


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); ImportError when it is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_exact_match(result: dict, path: str) -> str | None:
    """Draw the figure (module docstring) to path; None when the result has no exact-match block.
    Raises ImportError when matplotlib is missing (the caller reports it)."""
    panels = em_panels(result)
    if not panels:
        return None
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    handles = {}
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
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
