"""`python -m nanochat.report validate` on a temporary NANOCHAT_BASE_DIR: fake report sections plus the
tiny real SFT checkpoint of tests/test_chat_cli.py (its base_dir fixture)."""

import io
import json
import os
import subprocess
import sys

import pytest

from nanochat.report import Report
from nanochat.report_validate import EXPECTED_SECTIONS, validate
from tests.test_chat_cli import base_dir  # noqa: F401  (module-scoped fixture: tokenizer + chatsft tiny step 5)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_SMOKE = ["--max_tokens", "8", "-t", "0", "--device_type", "cpu"]


def write_sections(base, titles, generate=True):
    """Fake report sections (and report.md generated from them, as the recipes do at the end)."""
    report = Report(os.path.join(base, "report"))
    for title in titles:
        report.log(section=title, data=[{"val bpb": 0.9}])
    if generate:
        report.generate(copy_to=None)


def run_cli(base, *args):
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "nanochat.report", "validate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def complete_dir(base_dir):  # noqa: F811
    write_sections(base_dir, [title for _, title, _ in EXPECTED_SECTIONS])
    return base_dir


def test_complete_run_passes_with_smoke_prompt(complete_dir):
    out = io.StringIO()
    code = validate(complete_dir, "Summarize MegaContext.", smoke_timeout=120, smoke_args=FAST_SMOKE, out=out)
    text = out.getvalue()
    assert code == 0, text
    assert f"({len(EXPECTED_SECTIONS)}/{len(EXPECTED_SECTIONS)} present" in text
    assert "sft  tiny: step 5" in text and "base none" in text
    assert 'python -m scripts.chat_cli -i sft -p "Summarize MegaContext."' in text
    assert "latency:" in text
    reply = next(line for line in text.splitlines() if line.strip().startswith("reply:"))
    assert reply.split("reply:", 1)[1].strip()
    assert "VALIDATION PASSED" in text


def test_cli_default_smoke_prompt(complete_dir):
    r = run_cli(complete_dir, "--smoke_timeout", "240")
    assert r.returncode == 0, r.stdout + r.stderr
    assert '-p "Summarize MegaContext."' in r.stdout and "VALIDATION PASSED" in r.stdout


def test_missing_sections_are_listed_and_fail(tmp_path):
    base = str(tmp_path)
    write_sections(base, ["Tokenizer training", "Base model training", "Chat SFT"])
    r = run_cli(base, "--no_smoke")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "(3/9 present" in out
    assert "MISSING  Tokenizer evaluation  <- written by: python -m scripts.tok_eval" in out
    assert "MISSING  Chat evaluation sft  <- written by: python -m scripts.chat_eval -i sft" in out
    assert "MISSING  Midtraining  <- written by: python -m scripts.mid_train" in out
    assert "MISSING  Chat SFT" not in out
    assert "VALIDATION FAILED: 6 problem(s)" in out
    assert "Smoke prompt: skipped (--no_smoke)" in out
    assert "chat_cli" not in out  # --no_smoke: the prompt was not run


def test_no_smoke_skips_prompt_and_passes_without_checkpoints(tmp_path):
    base = str(tmp_path)
    write_sections(base, [title for _, title, _ in EXPECTED_SECTIONS])
    r = run_cli(base, "--no_smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipped (--no_smoke)" in r.stdout and "VALIDATION PASSED" in r.stdout
    for stage in ("base", "mid", "sft", "rl"):
        assert f"{stage:<4} none" in r.stdout


def test_failed_smoke_prompt_fails(tmp_path):
    base = str(tmp_path)  # sections complete, but no checkpoint to answer the prompt
    write_sections(base, [title for _, title, _ in EXPECTED_SECTIONS])
    out = io.StringIO()
    assert validate(base, "Hi", smoke_timeout=120, smoke_args=FAST_SMOKE, out=out) == 1
    text = out.getvalue()
    assert "FAILED:  exit code" in text and "smoke prompt failed" in text


def test_report_file_missing_stale_or_without_plots(tmp_path):
    base = str(tmp_path)
    titles = [title for _, title, _ in EXPECTED_SECTIONS]
    write_sections(base, titles, generate=False)
    out = io.StringIO()
    assert validate(base, None, out=out) == 1
    assert "PROBLEM  report.md: report.md not generated (run python -m nanochat.report generate)" in out.getvalue()
    write_sections(base, titles)
    report_md = os.path.join(base, "report", "report.md")
    os.utime(report_md, (1, 1))  # older than the sections: a stage re-ran after generate
    out = io.StringIO()
    assert validate(base, None, out=out) == 1 and "stale" in out.getvalue()
    with open(report_md, "a") as f:
        f.write("\nplots skipped: matplotlib is not installed in this Python (x)\n")
    out = io.StringIO()
    assert validate(base, None, out=out) == 1 and "report.md has no plots" in out.getvalue()


def test_mc_checkpoint_requires_mc_eval_and_curves_are_listed(tmp_path):
    base = str(tmp_path)
    step_dir = os.path.join(base, "base_checkpoints", "d4_mc", "step_000120")
    os.makedirs(step_dir)
    with open(os.path.join(step_dir, "meta.json"), "w") as f:
        json.dump({"step": 120, "mc_config": {"block_size": 32}}, f)
    os.makedirs(os.path.join(base, "report"))
    with open(os.path.join(base, "report", "base_train_curve.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": s, "tokens": s * 8192, "train_loss": 3.0}) + "\n" for s in (1, 120))
    write_sections(base, [title for _, title, _ in EXPECTED_SECTIONS])
    out = io.StringIO()
    assert validate(base, None, out=out) == 1
    text = out.getvalue()
    assert "base d4_mc: step 120 (MC)" in text
    assert "MISSING  MC evaluation  <- written by: python -m scripts.mc_eval --model_tag d4_mc" in text
    assert "curve    base_train_curve.jsonl: step 120, 983,040 tokens, 2 rows" in text
    write_sections(base, ["MC evaluation"])
    out = io.StringIO()
    assert validate(base, None, out=out) == 0, out.getvalue()
    assert f"({len(EXPECTED_SECTIONS) + 1}/{len(EXPECTED_SECTIONS) + 1} present" in out.getvalue()
