"""
Post-run validation (`python -m nanochat.report validate`): is this run ready to hand off?

    python -m nanochat.report validate                        # sections + checkpoints + smoke prompt
    python -m nanochat.report validate --smoke_prompt "Hi"    # another smoke prompt
    python -m nanochat.report validate --no_smoke             # skip the smoke prompt (no model load)

1. Report completeness: every expected section file in $NANOCHAT_BASE_DIR/report (EXPECTED_SECTIONS);
   a missing one is listed with the stage command that writes it.
2. Checkpoint audit: per stage (base/mid/sft/rl), each model tag and its latest complete step
   (informational: a missing stage shows as "none" but does not fail the check by itself).
3. Interactive smoke: `python -m scripts.chat_cli -i sft -p PROMPT` as a subprocess with a timeout;
   prints the reply and the latency (wall time of the whole command, model load included). It fails
   on a non-zero exit, a timeout or an empty reply.
Exit code 0 when everything checked passes, 1 otherwise.
"""

import os
import subprocess
import sys
import time

from nanochat.checkpoint_manager import SOURCE_DIRS, latest_step

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
DEFAULT_SMOKE_PROMPT = "Summarize MegaContext."
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_sections(report_dir: str) -> tuple[list, list]:
    """(present titles, missing (title, command)) of EXPECTED_SECTIONS in report_dir."""
    present, missing = [], []
    for slug, title, command in EXPECTED_SECTIONS:
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
    present, missing = check_sections(report_dir)
    say(f"## Report sections ({len(present)}/{len(EXPECTED_SECTIONS)} present in {report_dir})")
    for title in present:
        say(f"  ok       {title}")
    for title, command in missing:
        say(f"  MISSING  {title}  <- written by: {command}")
        problems.append(f"report section '{title}' missing (run {command})")
    say()
    say("## Checkpoints (tag: latest complete step)")
    for stage, tags in list_checkpoints(base_dir).items():
        folder = os.path.join(base_dir, SOURCE_DIRS[stage])
        listing = ", ".join(f"{tag}: {'no complete step' if step is None else f'step {step}'}" for tag, step in tags)
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
