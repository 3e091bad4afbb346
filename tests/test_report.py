"""Report: reset writes the system header, sections land in pipeline order, curves plot, summary table."""

import json
import os
import re
import subprocess
import sys

import pytest

from nanochat import report as rp


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "base"


def _write_curve(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_reset_log_generate(base, tmp_path):
    report = rp.get_report()
    assert isinstance(report, rp.Report)
    header = report.reset()
    text = open(header).read()
    for key in ("Run started", "Git commit", "Python", "PyTorch", "CPUs", "RAM", "GPUs"):
        assert f"- {key}: " in text
    # logged out of order, with a custom section in between
    report.log(section="Chat evaluation sft", data=[{"ARC-Easy": 0.3125, "ChatCORE metric": 0.05}])
    report.log(section="Base model evaluation", data=[{"CORE metric": 0.123456, "bundle": "synthetic"}])
    report.log(section="My extra experiment", data="free **markdown** text")
    report.log(section="Base model training", data=[{"depth": 4, "Final val bpb": 1.1, "Minimum val bpb": 1.05,
                                                     "Parameters": 1234567, "Peak memory (MiB)": None}])
    report.log(section="Base model loss", data=[{"train bpb": 0.97, "val bpb": 0.98}, "Greedy samples:\n\n    'x'"])
    report.log(section="Tokenizer training", data=[{"vocab_size": 65536}])
    report.log(section="Midtraining", data=[{"val bpb": 0.91}])
    rdir = base / "report"
    _write_curve(rdir / "base_train_curve.jsonl", [{"step": s, "tokens": s * 1000, "train_loss": 5.0 / (s + 1)}
                                                  for s in range(20)] + [{"step": 20, "tokens": 20000, "val_bpb": 1.1}])
    with open(rdir / "base_train_curve.jsonl", "a") as f:
        f.write('{"step": 21, "tok')  # a line cut off by a crash is skipped
    _write_curve(rdir / "mid_train_curve.jsonl", [{"step": s, "tokens": s * 10, "train_loss": 2.0 - s / 10} for s in range(5)])

    out_path = report.generate()
    assert out_path == str(rdir / "report.md")
    md = open(out_path).read()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings == ["Environment", "Tokenizer training", "Base model training", "Base model loss",
                        "Base model evaluation", "Midtraining", "Chat evaluation sft", "My extra experiment",
                        "Loss curves", "Summary"]
    assert "- Parameters: 1,234,567" in md and "- Peak memory (MiB): -" in md and "- CORE metric: 0.1235" in md
    png = rdir / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![loss curves](loss_curve.png)" in md
    summary = md.split("## Summary")[1]
    assert "| Metric | BASE | MID | SFT |" in summary
    assert "| CORE | 0.1235 | - | - |" in summary
    assert "| val bpb | 0.9800 | 0.9100 | - |" in summary  # base model loss' "val bpb" wins over training's
    assert "| ARC-Easy | - | - | 0.3125 |" in summary and "| ChatCORE | - | - | 0.0500 |" in summary
    assert "Total wall clock time" in summary
    copy = open(tmp_path / "report.md").read()  # ./report.md links the plot by absolute path
    assert f"![loss curves]({png})" in copy

    report.reset()  # a new run: old sections and curves are gone
    assert sorted(os.listdir(rdir)) == ["header.md"]


def test_generate_without_header_curves_or_metrics(base):
    report = rp.get_report()
    report.log(section="Something", data={"note": "x"})
    md = open(report.generate(copy_to=None)).read()
    assert "no header" in md and "No summary metrics found" in md and "Loss curves" not in md


def test_dummy_report_on_other_ranks(base, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report = rp.get_report()
    assert isinstance(report, rp.DummyReport)
    assert report.log(section="x", data=[{"a": 1}]) is None and report.generate() is None and report.reset() is None
    assert not (base / "report").exists()


def test_summary_key_matching():
    sections = {"base-model-evaluation": "## Base\n\n- core_metric: 0.2\n", "chat-evaluation-rl": "- gsm8k: 0.07\n"}
    table = rp.summary_table(sections)
    assert "| Metric | BASE | RL |" in table and "| CORE | 0.2 | - |" in table and "| GSM8K | - | 0.07 |" in table
    assert rp.slugify("Chat evaluation SFT!") == "chat-evaluation-sft"
    assert rp._fmt(0.5) == "0.5000" and rp._fmt(1e-6) == "1e-06" and rp._fmt(True) == "True"


def test_cli(base, tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    for cmd in ("reset", "generate"):
        r = subprocess.run([sys.executable, "-m", "nanochat.report", cmd], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "report.md").is_file() and "## Environment" in (tmp_path / "report.md").read_text()
    r = subprocess.run([sys.executable, "-m", "nanochat.report", "bogus"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr
