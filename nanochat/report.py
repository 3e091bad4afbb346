"""
The run report: every pipeline stage logs a markdown section; `generate` stitches them into one file.

    python -m nanochat.report reset      # start of a run: clear old sections/curves, write the system header
    python -m nanochat.report generate   # end of a run: $NANOCHAT_BASE_DIR/report/report.md, copied to ./report.md
    python -m nanochat.report validate   # after a run: sections present? checkpoints? smoke prompt (report_validate.py)

- Sections live in $NANOCHAT_BASE_DIR/report/<slug>.md, one file per section (slug of the title, e.g.
  "Base model training" -> base-model-training.md). Logging a section again replaces it.
  get_report().log(section="Base model loss", data=[{"val bpb": 0.91}, "free markdown"]): dicts become
  `- key: value` bullets, strings are written as they are.
- get_report() returns a no-op DummyReport on ranks other than 0, so scripts can call it unconditionally.
- generate orders sections the way the pipeline runs (SECTION_ORDER), then any others by time written;
  plots every *_curve.jsonl in the report folder (rows {step, tokens, train_loss?, val_bpb?}; x = tokens)
  into loss_curve.png and links it; ends with a summary table (metric x stage) built from the `- key: value`
  bullets of the sections. Keys it recognises (case, spaces, '-' and '_' ignored) are in SUMMARY_METRICS,
  e.g. "CORE metric", "val bpb" / "Final val bpb" / "Minimum val bpb", "ChatCORE metric", "ARC-Easy", "GSM8K".
- Sections from the floor above arrive the same way: MegaContext training logs "MegaContext curves"
  (mc/ops/report_curves.py draws mc_curves.png; `python -m scripts.mc_curves --compare PATH` overlays another
  run). Figures a section links by a bare file name (`![...](name.png)`) are re-linked by absolute path
  in the ./report.md copy. This module imports nothing from mc.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys

import psutil
import torch

from nanochat.common import get_base_dir, get_dist_info

SECTION_ORDER = ["tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-loss",
                 "base-model-evaluation", "midtraining", "chat-evaluation-mid", "chat-sft", "chat-evaluation-sft",
                 "chat-rl", "chat-evaluation-rl"]
STAGES = {"BASE": ["base-model-evaluation", "base-model-loss", "base-model-training"],
          "MID": ["chat-evaluation-mid", "midtraining"],
          "SFT": ["chat-evaluation-sft", "chat-sft"],
          "RL": ["chat-evaluation-rl", "chat-rl"]}
SUMMARY_METRICS = [  # (row name, keys in priority order)
    ("CORE", ["CORE metric", "CORE"]),
    ("val bpb", ["val bpb", "Final val bpb", "Minimum val bpb"]),
    ("train bpb", ["train bpb"]),
    ("ChatCORE", ["ChatCORE metric", "ChatCORE"]),
    ("ARC-Easy", ["ARC-Easy"]), ("ARC-Challenge", ["ARC-Challenge"]), ("MMLU", ["MMLU"]), ("GSM8K", ["GSM8K"]),
    ("HumanEval", ["HumanEval"]), ("SpellingBee", ["SpellingBee"]),
    ("passkey accuracy", ["passkey accuracy"]), ("gap recovery", ["gap recovery"]),
]
HEADER, OUTPUT, PLOT = "header.md", "report.md", "loss_curve.png"
NO_MATPLOTLIB = ("plots skipped: matplotlib is not installed in this Python ({error}); it is a dependency of "
                 "this project: `pip install matplotlib` (or re-run ./mc_setup), then `python -m nanochat.report generate`")
STARTED_KEY = "Run started"
TIME_FMT = "%Y-%m-%d %H:%M:%S"


def slugify(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def _norm_key(key: str) -> str:
    return re.sub(r"[\s_\-]+", "", key.lower())


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"


def _now() -> str:
    return datetime.datetime.now().strftime(TIME_FMT)


def _git(*args) -> str:
    try:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the code's checkout, not the cwd
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def system_info() -> dict:
    """What ran this: code version, software, hardware."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown (no commit yet or not a git checkout)"
    dirty = " (uncommitted changes)" if _git("status", "--porcelain") else ""
    gpus = "none"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        gpus = f"{len(names)} × {names[0]} ({mem:.0f} GiB each)"
    return {STARTED_KEY: _now(), "Git commit": commit + dirty, "Git branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "-",
            "Python": platform.python_version(), "PyTorch": torch.__version__,
            "CUDA": torch.version.cuda or "-", "Platform": platform.platform(),
            "CPUs": f"{os.cpu_count()} logical ({psutil.cpu_count(logical=False)} physical)",
            "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB", "GPUs": gpus,
            "Command": " ".join(sys.argv)}


def parse_bullets(markdown: str) -> dict:
    """`- key: value` lines of a section -> {normalized key: value text}."""
    out = {}
    for m in re.finditer(r"^- ([^:\n]+): (.+)$", markdown, flags=re.M):
        out.setdefault(_norm_key(m.group(1)), m.group(2).strip())
    return out


def summary_table(sections: dict[str, str]) -> str:
    """Markdown table, metric rows x stage columns, from the sections' bullets ({slug: markdown})."""
    bullets = {slug: parse_bullets(text) for slug, text in sections.items()}
    table = {}
    for name, keys in SUMMARY_METRICS:
        for stage, slugs in STAGES.items():
            value = next((bullets[s][_norm_key(k)] for k in keys for s in slugs
                          if s in bullets and _norm_key(k) in bullets[s]), None)
            if value is not None:
                table.setdefault(name, {})[stage] = value
    if not table:
        return "No summary metrics found in the sections.\n"
    stages = [s for s in STAGES if any(s in row for row in table.values())]
    lines = ["| Metric | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for name, _ in SUMMARY_METRICS:
        if name in table:
            lines.append(f"| {name} | " + " | ".join(table[name].get(s, "-") for s in stages) + " |")
    return "\n".join(lines) + "\n"


def read_curve(path: str) -> list[dict]:
    """Rows of a *_curve.jsonl; unreadable lines (e.g. one cut off by a crash) are skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "tokens" in row:
                rows.append(row)
    return rows


def plot_curves(curve_paths: list[str], out_path: str) -> str | None:
    """One row per curve file: train loss (left) and val bpb (right) against tokens. Returns out_path, or
    None when there is nothing to plot."""
    curves = [(os.path.basename(p).removesuffix("_curve.jsonl"), read_curve(p)) for p in curve_paths]
    curves = [(n, rows) for n, rows in curves if rows]
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 3.4 * len(curves)), squeeze=False)
    for (name, rows), (ax_loss, ax_bpb) in zip(curves, axes):
        for ax, key, title in ((ax_loss, "train_loss", "train loss (nats/token)"), (ax_bpb, "val_bpb", "val bpb")):
            pts = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
            else:
                ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{name}: {title}")
            ax.set_xlabel("tokens")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def _pyplot():
    """matplotlib.pyplot on the Agg backend; ImportError (the caller reports it) when not installed."""
    # matplotlib is slow to import and only needed to draw the loss curve
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Report:
    """Markdown sections in report_dir (see module docstring)."""

    def __init__(self, report_dir: str):
        self.report_dir = report_dir
        os.makedirs(report_dir, exist_ok=True)

    def log(self, section: str, data) -> str:
        """Write (replace) one section. data: a dict, a str, or a list of them."""
        items = data if isinstance(data, (list, tuple)) else [data]
        lines = [f"## {section}", f"timestamp: {_now()}", ""]
        for item in items:
            if isinstance(item, dict):
                lines += [f"- {k}: {_fmt(v)}" for k, v in item.items()]
            else:
                lines.append(str(item).rstrip("\n"))
            lines.append("")
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        os.replace(tmp, path)
        return path

    def reset(self) -> str:
        """Remove the previous run's sections, curves and outputs; write the header with system info."""
        for pattern in ("*.md", "*_curve.jsonl", "*.png"):
            for path in glob.glob(os.path.join(self.report_dir, pattern)):
                os.remove(path)
        info = system_info()
        lines = ["# nanochat training report", "", "## Environment", ""] + [f"- {k}: {v}" for k, v in info.items()]
        with open(os.path.join(self.report_dir, HEADER), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return os.path.join(self.report_dir, HEADER)

    def _sections(self) -> dict[str, str]:
        """{slug: markdown} for every section file, in pipeline order, then others by time written."""
        paths = [p for p in glob.glob(os.path.join(self.report_dir, "*.md"))
                 if os.path.basename(p) not in (HEADER, OUTPUT)]
        rank = {slug: i for i, slug in enumerate(SECTION_ORDER)}

        def key(p):
            slug = os.path.basename(p)[:-3]
            return (rank.get(slug, len(rank)), os.path.getmtime(p), slug)

        out = {}
        for p in sorted(paths, key=key):
            with open(p, encoding="utf-8") as f:
                out[os.path.basename(p)[:-3]] = f.read()
        return out

    def generate(self, copy_to: str | None = OUTPUT) -> str:
        """Write report_dir/report.md (and a copy at copy_to, with the plots linked by absolute path)."""
        header_path = os.path.join(self.report_dir, HEADER)
        header = "# nanochat training report\n\n(no header: run `python -m nanochat.report reset` at the start of a run)\n"
        if os.path.isfile(header_path):
            with open(header_path, encoding="utf-8") as f:
                header = f.read()
        sections = self._sections()
        parts = [header.rstrip("\n")] + [text.rstrip("\n") for text in sections.values()]
        curves = sorted(glob.glob(os.path.join(self.report_dir, "*_curve.jsonl")))
        try:
            if plot_curves(curves, os.path.join(self.report_dir, PLOT)):
                parts.append(f"## Loss curves\n\n![loss curves]({PLOT})")
        except ImportError as e:
            print(f"warning: loss-curve {NO_MATPLOTLIB.format(error=e)}", file=sys.stderr)
            parts.append("## Loss curves\n\n" + NO_MATPLOTLIB.format(error=e))
        summary = ["## Summary", "", summary_table(sections).rstrip("\n")]
        started = re.search(rf"^- {STARTED_KEY}: (.+)$", header, flags=re.M)
        if started:
            try:
                elapsed = datetime.datetime.now() - datetime.datetime.strptime(started.group(1).strip(), TIME_FMT)
                summary += ["", f"Total wall clock time: {elapsed.total_seconds() / 3600:.2f} h ({started.group(1)} → {_now()})"]
            except ValueError:
                pass
        parts.append("\n".join(summary))
        text = "\n\n".join(parts) + "\n"
        out_path = os.path.join(self.report_dir, OUTPUT)
        with open(out_path, "w", encoding="utf-8") as f:
            f.write(text)
        if copy_to and os.path.abspath(copy_to) != os.path.abspath(out_path):
            with open(copy_to, "w", encoding="utf-8") as f:
                f.write(re.sub(r"\]\(([^/()\s]+\.png)\)",
                               lambda m: f"]({os.path.abspath(os.path.join(self.report_dir, m.group(1)))})", text))
        return out_path


class DummyReport:
    """What ranks other than 0 get: every call does nothing."""

    def log(self, *args, **kwargs):
        return None

    def reset(self, *args, **kwargs):
        return None

    def generate(self, *args, **kwargs):
        return None


def get_report():
    """The run's Report on rank 0 ($NANOCHAT_BASE_DIR/report), a DummyReport elsewhere."""
    if get_dist_info()[1] != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build or check the run report.", allow_abbrev=False)
    parser.add_argument("command", choices=["reset", "generate", "validate"],
                        help="reset | generate | validate (post-run check, see nanochat/report_validate.py)")
    parser.add_argument("--smoke_prompt", default=None,
                        help='validate: the chat_cli smoke prompt (default "Summarize MegaContext.")')
    parser.add_argument("--no_smoke", action="store_true", help="validate: skip the smoke prompt")
    parser.add_argument("--smoke_timeout", type=float, default=300.0, help="validate: seconds for the smoke prompt")
    parser.add_argument("--compare", action="append", default=[], metavar="PATH",
                        help="deprecated: `python -m scripts.mc_curves --compare PATH` draws the MegaContext curves "
                             "with another run overlaid (this flag runs it first, for one more release)")
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    if args.command == "validate":
        from nanochat.report_validate import DEFAULT_SMOKE_PROMPT, validate

        prompt = None if args.no_smoke else (args.smoke_prompt or DEFAULT_SMOKE_PROMPT)
        sys.exit(validate(get_base_dir(), prompt, args.smoke_timeout))
    report = get_report()
    if args.command == "reset":
        print(f"report reset: {report.reset()}")
    else:
        try:
            if args.compare:  # the MC curves live upstairs now (mc/ops/report_curves.py): run their CLI, then stitch
                print("warning: generate --compare is deprecated; run `python -m scripts.mc_curves --compare PATH`, "
                      "then `python -m nanochat.report generate`", file=sys.stderr)
                forwarded = subprocess.run([sys.executable, "-m", "scripts.mc_curves",
                                            *[f"--compare={c}" for c in args.compare]])
                if forwarded.returncode:
                    sys.exit(forwarded.returncode)
            path = report.generate()
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        with open(path, encoding="utf-8") as f:
            print(f.read())
        print(f"report written to {path} and copied to {os.path.abspath(OUTPUT)}")
