"""
The report's "MegaContext curves" section (mc_curves.png), logged by MC base training at its end and by
`python -m scripts.mc_curves --compare PATH` (another run overlaid); nanochat.report generate stitches it
like any other section.

Panels, from base_train_curve.jsonl and any compared runs (another run's NANOCHAT_BASE_DIR, report folder
or curve file): (1) loss vs tokens, baseline vs MC: each run's train_loss (the plain LM loss in both modes),
plus an MC run's variant loss and recency-baseline loss; (2) LOD mix: the fraction of WC entries per level
of detail when the rows carry it, else the loss per LOD; (3) ΔNLL@H over training (mean and p95) with the
alert band of mc/ops/alerts.py. Row fields read (W&B names; "/" and "_" are interchangeable, so mc/lod_loss/1
= mc_lod_loss_1): mc_token_loss, mc_loss_lod0, mc/lod_frac/<L>, mc/lod_loss/<L>, mc/adv_delta_mean,
mc/adv_delta_p95. A panel whose fields are absent says so in the section; nothing is skipped silently,
and neither is the figure when matplotlib is missing (the section says "plots skipped" and why).
"""

import os
import sys

from mc.ops.alerts import BandMonitor  # the ΔNLL band drawn is the one the alerts use
from nanochat.report import NO_MATPLOTLIB, _pyplot, read_curve

SECTION = "MegaContext curves"
MC_PLOT = "mc_curves.png"
BASE_CURVE = "base_train_curve.jsonl"  # the curve the MC plots compare (pretraining is where MC differs)



def mc_fields(row: dict) -> dict:
    """A curve row with MC keys normalised to underscores (mc/lod_loss/1 -> mc_lod_loss_1)."""
    return {k.replace("/", "_"): v for k, v in row.items()}


def _series(rows, key):
    pts = [(r["tokens"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _levels(rows, prefix):
    """Sorted LOD numbers L for which some row has prefix + L (e.g. mc_lod_loss_ -> [0, 1, 2])."""
    found = {int(k[len(prefix):]) for r in rows for k in r if k.startswith(prefix) and k[len(prefix):].isdigit()}
    return sorted(found)


def is_mc_curve(rows) -> bool:
    return any(k.startswith("mc_") for r in rows for k in r)


def resolve_compare(path: str) -> str:
    """A --compare argument -> a curve file: the file itself, or <dir>/report/base_train_curve.jsonl, or
    <dir>/base_train_curve.jsonl. FileNotFoundError naming what was tried."""
    tried = [path] if os.path.isfile(path) else [os.path.join(path, "report", BASE_CURVE), os.path.join(path, BASE_CURVE)]
    for p in tried:
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"--compare {path}: no curve file at {' or '.join(tried)}")


def mc_runs(report_dir: str, compare=()) -> list[tuple[str, list[dict]]]:
    """[(label, normalised rows)]: this run's base_train curve first, then each --compare run's."""
    runs = []
    own = os.path.join(report_dir, BASE_CURVE)
    if os.path.isfile(own):
        rows = [mc_fields(r) for r in read_curve(own)]
        runs.append((f"this run ({'MC' if is_mc_curve(rows) else 'vanilla'})", rows))
    for path in compare:
        rows = [mc_fields(r) for r in read_curve(resolve_compare(path))]
        where = "/".join(os.path.normpath(os.path.abspath(path)).split(os.sep)[-2:])  # enough to tell runs apart
        runs.append((f"{'MC' if is_mc_curve(rows) else 'vanilla'} ({where})", rows))
    return [(label, rows) for label, rows in runs if rows]


def plot_mc_curves(runs, out_path: str) -> list[str]:
    """Draw mc_curves.png (1 x 3 panels) from mc_runs(); returns one note per panel saying what it shows or
    which row fields it lacked. Raises ImportError when matplotlib is missing."""
    plt = _pyplot()
    fig, (ax_loss, ax_lod, ax_delta) = plt.subplots(1, 3, figsize=(16, 4.2))
    notes = []
    for i, (label, rows) in enumerate(runs):
        style = "-" if i == 0 else "--"
        for key, what in (("train_loss", "LM loss"), ("mc_token_loss", "MC variant loss"),
                          ("mc_loss_lod0", "recency baseline (last W raw)")):
            xs, ys = _series(rows, key)
            if xs:
                ax_loss.plot(xs, ys, style, label=f"{label}: {what}")
    ax_loss.set_title("loss vs tokens: baseline vs MC (nats/token)")
    notes.append("loss vs tokens: " + "; ".join(label for label, _ in runs))
    mc = [(label, rows) for label, rows in runs if is_mc_curve(rows)]
    label, rows = mc[0] if mc else (None, [])
    fracs, losses = _levels(rows, "mc_lod_frac_"), _levels(rows, "mc_lod_loss_")
    if fracs:
        logged = [r for r in rows if any(isinstance(r.get(f"mc_lod_frac_{L}"), (int, float)) for L in fracs)]
        ax_lod.stackplot([r["tokens"] for r in logged], [[r.get(f"mc_lod_frac_{L}") or 0.0 for r in logged] for L in fracs],
                         labels=[f"LOD{L}" for L in fracs])
        ax_lod.set_title(f"LOD mix of the working context ({label})")
        notes.append(f"LOD mix: fraction of WC entries per level (mc/lod_frac/L, L = {fracs})")
    elif losses:
        for L in losses:
            ax_lod.plot(*_series(rows, f"mc_lod_loss_{L}"), label=f"LOD{L} loss")
        ax_lod.set_title(f"loss per level of detail ({label})")
        notes.append(f"LOD mix: loss per level of detail (mc/lod_loss/L, L = {losses}); the rows carry no "
                     "mc/lod_frac/L, so the entry fractions are not drawn")
    else:
        ax_lod.text(0.5, 0.5, "no mc/lod_frac/L or mc/lod_loss/L\nin the curve rows", ha="center", va="center",
                    transform=ax_lod.transAxes)
        ax_lod.set_title("LOD mix")
        notes.append("LOD mix: NOT DRAWN: " + ("no MC run among the curves" if not mc else
                     f"{label}'s curve rows carry neither mc/lod_frac/L nor mc/lod_loss/L"))
    drawn = False
    for key, what in (("mc_adv_delta_mean", "mean"), ("mc_adv_delta_p95", "p95")):
        xs, ys = _series(rows, key)
        if xs:
            ax_delta.plot(xs, ys, label=f"ΔNLL {what}")
            drawn = True
    if drawn:
        ax_delta.axhline(0.10, color="tab:green", lw=0.8, ls=":", label="target ≤ 0.10")
        ax_delta.axhline(BandMonitor.delta_investigate, color="tab:red", lw=0.8, ls=":",
                         label=f"investigate > {BandMonitor.delta_investigate:g}")
        ax_delta.axhline(0.0, color="gray", lw=0.5)
        notes.append(f"ΔNLL@H: mc/adv_delta_mean and p95 of {label} (variants minus the recency baseline on the horizon)")
    else:
        ax_delta.text(0.5, 0.5, "no mc/adv_delta_mean|p95\nin the curve rows", ha="center", va="center",
                      transform=ax_delta.transAxes)
        notes.append("ΔNLL@H: NOT DRAWN: " + ("no MC run among the curves" if not mc else
                     f"{label}'s curve rows carry no mc/adv_delta_mean / mc/adv_delta_p95"))
    ax_delta.set_title("ΔNLL@H over training (lower = gists help)")
    for ax in (ax_loss, ax_lod, ax_delta):
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return notes


def section_body(report_dir: str, compare=()) -> str | None:
    """The section's markdown below its title (draws mc_curves.png), or None for a vanilla run with nothing
    to compare."""
    runs = mc_runs(report_dir, compare)
    if not runs:
        return None if not compare else "Not drawn: no base_train curve in this run or the --compare runs."
    if not any(is_mc_curve(rows) for _, rows in runs) and not compare:
        return ("Not drawn: this run's base_train curve has no MegaContext metrics (a vanilla run). "
                "`python -m scripts.mc_curves --compare PATH` overlays an MC run (PATH = its NANOCHAT_BASE_DIR).")
    try:
        notes = plot_mc_curves(runs, os.path.join(report_dir, MC_PLOT))
    except ImportError as e:
        print(f"warning: MegaContext {NO_MATPLOTLIB.format(error=e)}", file=sys.stderr)
        return NO_MATPLOTLIB.format(error=e)
    return f"![MegaContext curves]({MC_PLOT})\n\n" + "\n".join(f"- {n}" for n in notes)


def log_curves_section(report, compare=()) -> str | None:
    """Write the section (section_body) into the report's folder as "MegaContext curves"; None when there
    is nothing to draw (a vanilla run, nothing compared). report: a nanochat.report Report (DummyReport on
    other ranks: nothing is written)."""
    report_dir = getattr(report, "report_dir", None)
    if report_dir is None:
        return None
    body = section_body(report_dir, compare)
    return None if body is None else report.log(section=SECTION, data=body)
