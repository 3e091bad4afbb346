"""
Post-run validation (`python -m nanochat.report validate`): is this run ready to hand off?

    python -m nanochat.report validate                        # sections + checkpoints + smoke prompt
    python -m nanochat.report validate --smoke_prompt "Hi"    # another smoke prompt
    python -m nanochat.report validate --no_smoke             # skip the smoke prompt (no model load)

1. Report completeness: every expected section file in $NANOCHAT_BASE_DIR/report (EXPECTED_SECTIONS, plus
   "MC evaluation" when a base checkpoint is MegaContext-trained: meta.json has mc_config); a missing one
   is listed with the stage command that writes it. report.md must exist, be newer than every section
   (else it is stale: re-run generate) and have its plots (not "plots skipped"). Each *_curve.jsonl is
   listed with its last step and token count.
2. Checkpoint audit: per stage (base/mid/sft/rl), each model tag, its latest complete step and whether it
   is an MC checkpoint (informational: a missing stage shows as "none" but does not fail by itself).
3. Interactive smoke: `python -m scripts.chat_cli -i sft -p PROMPT` as a subprocess with a timeout;
   prints the reply and the latency (wall time of the whole command, model load included). It fails
   on a non-zero exit, a timeout or an empty reply.
Exit code 0 when everything checked passes, 1 otherwise.
"""

import glob
import json
import os
import subprocess
import sys
import time

from nanochat.checkpoint_manager import SOURCE_DIRS, latest_step
from nanochat.report import NO_MATPLOTLIB, OUTPUT, read_curve

# (section slug, title, stage command that writes it)
EXPECTED_SECTIONS = [
    ("tokenizer-training", "Tokenizer training", "python -m scripts.tok_train"),
    ("tokenizer-evaluation", "Tokenizer evaluation", "python -m scripts.tok_eval"),
    ("base-model-training", "Base model training", "python -m scripts.base_train"),
    ("base-model-loss", "Base model loss", "python -m scripts.base_loss"),
    ("base-model-evaluation", "Base model evaluation", "python -m scripts.base_eval"),
    ("midtraining", "Midtraining", "python -m scripts.mid_train"),
    ("chat-evaluation-mid", "Chat evaluation mid", "python -m scripts.chat_eval -i mid"),
    ("chat-sft", "Chat SFT", "python -m scripts.chat_sft"),
    ("chat-evaluation-sft", "Chat evaluation sft", "python -m scripts.chat_eval -i sft"),
]
MC_SECTION = ("mc-evaluation", "MC evaluation", "python -m scripts.mc_eval --model_tag {tag}")
DEFAULT_SMOKE_PROMPT = "Summarize MegaContext."
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_sections(report_dir: str, mc_tags=()) -> tuple[list, list]:
    """(present titles, missing (title, command)) of EXPECTED_SECTIONS in report_dir, plus the MC evaluation
    section when mc_tags (MegaContext-trained base checkpoints) is not empty."""
    present, missing = [], []
    expected = list(EXPECTED_SECTIONS)
    if mc_tags:
        slug, title, command = MC_SECTION
        expected.append((slug, title, command.format(tag=mc_tags[0])))
    for slug, title, command in expected:
        if os.path.isfile(os.path.join(report_dir, slug + ".md")):
            present.append(title)
        else:
            missing.append((title, command))
    return present, missing


def list_checkpoints(base_dir: str) -> dict[str, list[tuple[str, int | None]]]:
    """{stage: [(model tag, latest complete step or None)]} for every stage in SOURCE_DIRS."""
    out = {}
    for stage, folder in SOURCE_DIRS.items():
        root = os.path.join(base_dir, folder)
        tags = sorted(t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t))) if os.path.isdir(root) else []
        out[stage] = [(tag, latest_step(os.path.join(root, tag))) for tag in tags]
    return out


def is_mc_checkpoint(base_dir: str, stage: str, tag: str, step: int | None) -> bool:
    """Whether that checkpoint was MegaContext-trained (its meta.json has mc_config)."""
    if step is None:
        return False
    path = os.path.join(base_dir, SOURCE_DIRS[stage], tag, f"step_{step:06d}", "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            return bool(json.load(f).get("mc_config"))
    except (OSError, ValueError):
        return False  # unreadable meta: load_model reports it properly; here it only decides a label


def check_report_file(report_dir: str) -> str | None:
    """Problem with report.md (missing, older than a section, plots skipped), or None when it is fine."""
    path = os.path.join(report_dir, OUTPUT)
    if not os.path.isfile(path):
        return "report.md not generated (run python -m nanochat.report generate)"
    sections = [p for p in glob.glob(os.path.join(report_dir, "*.md")) if os.path.basename(p) not in (OUTPUT, "header.md")]
    newest = max((os.path.getmtime(p) for p in sections), default=0.0)
    if os.path.getmtime(path) < newest:
        return "report.md is older than some sections (stale: re-run python -m nanochat.report generate)"
    with open(path, encoding="utf-8") as f:
        if NO_MATPLOTLIB.split(":", 1)[0] in f.read():
            return "report.md has no plots: matplotlib was missing when it was generated (pip install matplotlib, regenerate)"
    return None


def curve_summaries(report_dir: str) -> list[str]:
    """One line per *_curve.jsonl: its last step and tokens (what the training stages got to)."""
    out = []
    for path in sorted(glob.glob(os.path.join(report_dir, "*_curve.jsonl"))):
        rows = read_curve(path)
        name = os.path.basename(path)
        if not rows:
            out.append(f"{name}: empty")
            continue
        last = max(rows, key=lambda r: (r.get("step", 0), r["tokens"]))
        out.append(f"{name}: step {last.get('step', '?')}, {last['tokens']:,} tokens, {len(rows)} rows")
    return out


def run_smoke(base_dir: str, prompt: str, timeout: float, extra_args=()) -> dict:
    """Run the chat_cli one-shot prompt on base_dir's checkpoints; {ok, reply, latency_s, error, command}."""
    cmd = [sys.executable, "-m", "scripts.chat_cli", "-i", "sft", "-p", prompt, *extra_args]
    shown = f'python -m scripts.chat_cli -i sft -p "{prompt}"' + "".join(f" {a}" for a in extra_args)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, NANOCHAT_BASE_DIR=base_dir),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(ok=False, reply="", latency_s=time.perf_counter() - t0, command=shown,
                    error=f"timed out after {timeout:g} s")
    latency = time.perf_counter() - t0
    lines = r.stdout.splitlines()
    if lines and lines[0].startswith("loading "):  # load_model's "loading <dir> step N" line
        lines = lines[1:]
    reply = "\n".join(lines).strip()
    error = ""
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-5:]
        error = f"exit code {r.returncode}: " + " | ".join(tail)
    elif not reply:
        error = "empty reply"
    return dict(ok=not error, reply=reply, latency_s=latency, error=error, command=shown)


def validate(base_dir: str, smoke_prompt: str | None = DEFAULT_SMOKE_PROMPT, smoke_timeout: float = 300.0,
             smoke_args=(), out=sys.stdout) -> int:
    """Print the validation summary for base_dir; 0 when complete, 1 otherwise. smoke_prompt=None skips it."""
    def say(line=""):
        print(line, file=out, flush=True)

    report_dir = os.path.join(base_dir, "report")
    problems = []
    say(f"# Post-run validation of {base_dir}")
    say()
    checkpoints = list_checkpoints(base_dir)
    mc_tags = [tag for tag, step in checkpoints["base"] if is_mc_checkpoint(base_dir, "base", tag, step)]
    present, missing = check_sections(report_dir, mc_tags)
    say(f"## Report sections ({len(present)}/{len(present) + len(missing)} present in {report_dir})")
    for title in present:
        say(f"  ok       {title}")
    for title, command in missing:
        say(f"  MISSING  {title}  <- written by: {command}")
        problems.append(f"report section '{title}' missing (run {command})")
    report_problem = check_report_file(report_dir)
    say(f"  {'ok      ' if report_problem is None else 'PROBLEM '} report.md" +
        ("" if report_problem is None else f": {report_problem}"))
    if report_problem:
        problems.append(report_problem)
    for line in curve_summaries(report_dir):
        say(f"  curve    {line}")
    say()
    say("## Checkpoints (tag: latest complete step)")
    for stage, tags in checkpoints.items():
        folder = os.path.join(base_dir, SOURCE_DIRS[stage])
        listing = ", ".join(f"{tag}: {'no complete step' if step is None else f'step {step}'}"
                            f"{' (MC)' if is_mc_checkpoint(base_dir, stage, tag, step) else ''}" for tag, step in tags)
        say(f"  {stage:<4} {listing or 'none'}  ({folder})")
    say()
    if smoke_prompt is None:
        say("## Smoke prompt: skipped (--no_smoke)")
    else:
        smoke = run_smoke(base_dir, smoke_prompt, smoke_timeout, smoke_args)
        say("## Smoke prompt")
        say(f"  command: {smoke['command']}")
        say(f"  latency: {smoke['latency_s']:.1f} s (whole command, model load included)")
        if smoke["reply"]:
            say("  reply:   " + smoke["reply"].replace("\n", "\n           "))
        if not smoke["ok"]:
            say(f"  FAILED:  {smoke['error']}")
            problems.append(f"smoke prompt failed ({smoke['error']})")
    say()
    if problems:
        say(f"VALIDATION FAILED: {len(problems)} problem(s)")
        for p in problems:
            say(f"  - {p}")
        return 1
    say("VALIDATION PASSED: report complete" + ("" if smoke_prompt is None else ", smoke prompt answered"))
    return 0
