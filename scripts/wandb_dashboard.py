"""
Create the "MC vs Baseline (Tokens)" W&B workspace from dev/wandb_dashboard.json.

    python -m scripts.wandb_dashboard --entity ME --project nanochat        # creates the workspace, prints its URL
    python -m scripts.wandb_dashboard --entity ME --project nanochat --dry_run   # print the panels, no network

The JSON is a plain, documented template (obsidian/ops/W&B dashboard.md): a workspace name, the x-axis
metric every panel uses (train/tokens: token-aligned, so MC and vanilla runs overlay whatever their
micro-batch split), a run grouping (the mc_enabled config value), and sections of line panels
{title, y: [metric, ...], x?: metric, note?}. This script validates it and builds the workspace with
the `wandb-workspaces` package (optional: `pip install wandb-workspaces`, or the project's `dashboard`
extra); without it the script says so and exits 1 rather than doing anything half-way.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PATH = os.path.join(ROOT, "dev", "wandb_dashboard.json")
INSTALL_HINT = "pip install wandb-workspaces (or: pip install -e '.[dashboard]')"


class DashboardError(ValueError):
    """The dashboard JSON is malformed; the message names the field."""


def load_dashboard(path: str = DEFAULT_PATH) -> dict:
    """Read and validate the template; DashboardError naming the bad field otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        raise DashboardError(f"cannot read dashboard template {path}: {e}") from e
    for key in ("name", "x_axis", "sections"):
        if key not in dash:
            raise DashboardError(f"{path}: missing top-level field {key!r}")
    if not isinstance(dash["x_axis"], str) or not dash["x_axis"]:
        raise DashboardError(f"{path}: x_axis must be a metric name, got {dash['x_axis']!r}")
    group = dash.get("group_by")
    if group is not None and (not isinstance(group, dict) or set(group) != {"config"}):
        raise DashboardError(f"{path}: group_by must be {{\"config\": KEY}}, got {group!r}")
    if not isinstance(dash["sections"], list) or not dash["sections"]:
        raise DashboardError(f"{path}: sections must be a non-empty list")
    for s, section in enumerate(dash["sections"]):
        if not section.get("name") or not isinstance(section.get("panels"), list) or not section["panels"]:
            raise DashboardError(f"{path}: sections[{s}] needs a name and a non-empty panels list")
        for p, panel in enumerate(section["panels"]):
            where = f"{path}: sections[{s}].panels[{p}]"
            if not panel.get("title"):
                raise DashboardError(f"{where} has no title")
            ys = panel.get("y")
            if not isinstance(ys, list) or not ys or not all(isinstance(y, str) and y for y in ys):
                raise DashboardError(f"{where} ({panel['title']!r}): y must be a non-empty list of metric names")
            unknown = sorted(set(panel) - {"title", "x", "y", "note"})
            if unknown:
                raise DashboardError(f"{where} ({panel['title']!r}): unknown field(s) {unknown}")
    return dash


def panels(dash: dict):
    """(section name, title, x metric, [y metrics]) for every panel; x defaults to the dashboard's x_axis."""
    for section in dash["sections"]:
        for panel in section["panels"]:
            yield section["name"], panel["title"], panel.get("x", dash["x_axis"]), list(panel["y"])


def referenced_metrics(dash: dict) -> set[str]:
    """Every metric name the template plots (x and y)."""
    out = set()
    for _, _, x, ys in panels(dash):
        out.add(x)
        out.update(ys)
    return out


def build_workspace(dash: dict, entity: str, project: str, ws, wr):
    """The wandb_workspaces Workspace for the template (not saved). ws = wandb_workspaces.workspaces,
    wr = wandb_workspaces.reports.v2 (passed in so the mapping can be tested without the package)."""
    sections = []
    for section in dash["sections"]:
        plots = [wr.LinePlot(title=p["title"], x=p.get("x", dash["x_axis"]), y=list(p["y"]),
                             title_x=p.get("x", dash["x_axis"])) for p in section["panels"]]
        sections.append(ws.Section(name=section["name"], panels=plots, is_open=True))
    runset = {}
    if dash.get("group_by"):
        runset["runset_settings"] = ws.RunsetSettings(groupby=[ws.Config(dash["group_by"]["config"])])
    return ws.Workspace(name=dash["name"], entity=entity, project=project, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=dash["x_axis"]), **runset)


def import_workspaces():
    """(ws, wr) from wandb_workspaces, or ImportError with the install hint."""
    try:
        # wandb-workspaces is an optional extra, imported only when the workspace is built
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise ImportError(f"creating a W&B workspace needs the wandb-workspaces package ({e}): {INSTALL_HINT}. "
                          "Or build it by hand from the panel list: obsidian/ops/W&B dashboard.md") from e
    return ws, wr


def describe(dash: dict) -> str:
    lines = [f"{dash['name']}: x = {dash['x_axis']}" +
             (f", runs grouped by config.{dash['group_by']['config']}" if dash.get("group_by") else "")]
    for section, title, x, ys in panels(dash):
        lines.append(f"  [{section}] {title}: {', '.join(ys)}" + ("" if x == dash["x_axis"] else f" (x = {x})"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Create the MC vs Baseline (Tokens) W&B workspace.",
                                     allow_abbrev=False)
    parser.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"),
                        help="W&B entity (user or team) that owns the project (default: $WANDB_ENTITY)")
    parser.add_argument("--project", default=None,
                        help="W&B project the runs log to (default: the template's, 'nanochat' for base_train)")
    parser.add_argument("--dashboard", default=DEFAULT_PATH, help="template JSON (default: dev/wandb_dashboard.json)")
    parser.add_argument("--name", default=None, help="workspace name (default: the template's)")
    parser.add_argument("--dry_run", action="store_true", help="validate and print the panels; no W&B calls")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dash = load_dashboard(args.dashboard)
    except DashboardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.name:
        dash["name"] = args.name
    project = args.project or dash.get("project") or "nanochat"
    print(describe(dash))
    if args.dry_run:
        return 0
    if not args.entity:
        print("error: pass --entity (your W&B user or team) or set WANDB_ENTITY", file=sys.stderr)
        return 1
    try:
        ws, wr = import_workspaces()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    workspace = build_workspace(dash, args.entity, project, ws, wr).save()
    print(f"workspace saved: {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
