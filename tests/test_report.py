"""Report: reset writes the system header, sections land in pipeline order, curves plot, summary table."""

import json
import os
import re
import subprocess
import sys

import pytest

from mc.ops.report_curves import log_curves_section
from nanochat import report as rp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert "MegaContext curves" not in md  # a vanilla run: MC training logs that section, nobody else
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


# -------------------------------------------------------------------------------------------------
# MegaContext curves: baseline vs MC loss, LOD mix, ΔNLL (small fixture curves)

def mc_rows(n=12, lod_frac=False, deltas=True, slash=True):
    """An MC run's base_train curve as the trainer writes it (+ the MC fields the report reads)."""
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "tokens": s * 4096, "train_loss": 6.0 - 0.2 * s, "mc_token_loss": 6.3 - 0.2 * s,
               "mc_loss_lod0": 6.5 - 0.18 * s}
        lod = {f"mc/lod_loss/{L}": 6.0 + L - 0.2 * s for L in range(3)}
        if deltas:
            lod.update({"mc/adv_delta_mean": 0.2 - 0.01 * s, "mc/adv_delta_p95": 0.5 - 0.02 * s})
        if lod_frac:
            lod.update({"mc/lod_frac/0": 0.6, "mc/lod_frac/1": 0.3, "mc/lod_frac/2": 0.1})
        row.update(lod if slash else {k.replace("/", "_"): v for k, v in lod.items()})
        rows.append(row)
    return rows + [{"step": n, "tokens": n * 4096, "val_bpb": 1.2}]


def mc_part(md):
    return md.split("## MegaContext curves", 1)[1].split("\n## ", 1)[0]


def test_mc_curves_baseline_vs_mc(base, tmp_path):
    report = rp.get_report()
    report.reset()
    _write_curve(base / "report" / "base_train_curve.jsonl", mc_rows())
    vanilla = tmp_path / "vanilla_run"
    (vanilla / "report").mkdir(parents=True)
    _write_curve(vanilla / "report" / "base_train_curve.jsonl",
                 [{"step": s, "tokens": s * 4096, "train_loss": 6.1 - 0.2 * s} for s in range(1, 13)])
    log_curves_section(report, [str(vanilla)])
    md = open(report.generate()).read()
    part = mc_part(md)
    png = base / "report" / "mc_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![MegaContext curves](mc_curves.png)" in part
    assert re.search(r"loss vs tokens: this run \(MC\); vanilla \([^)]*/vanilla_run\)", part), part
    assert "loss per level of detail (mc/lod_loss/L, L = [0, 1, 2])" in part
    assert "ΔNLL@H: mc/adv_delta_mean and p95 of this run (MC)" in part
    assert "NOT DRAWN" not in part
    assert f"![MegaContext curves]({png})" in open(tmp_path / "report.md").read()
    report.reset()
    assert not png.exists()


def test_mc_curves_name_missing_fields(base):
    report = rp.get_report()
    _write_curve(base / "report" / "base_train_curve.jsonl",
                 [{"step": s, "tokens": s * 10, "train_loss": 3.0, "mc_token_loss": 3.2, "mc_loss_lod0": 3.4}
                  for s in range(1, 5)])
    log_curves_section(report)
    part = mc_part(open(report.generate(copy_to=None)).read())
    assert "LOD mix: NOT DRAWN: this run (MC)'s curve rows carry neither mc/lod_frac/L nor mc/lod_loss/L" in part
    assert "ΔNLL@H: NOT DRAWN: this run (MC)'s curve rows carry no mc/adv_delta_mean" in part


def test_mc_curves_lod_fractions_and_underscore_names(base):
    report = rp.get_report()
    _write_curve(base / "report" / "base_train_curve.jsonl", mc_rows(lod_frac=True, slash=False))
    log_curves_section(report)
    part = mc_part(open(report.generate(copy_to=None)).read())
    assert "LOD mix: fraction of WC entries per level (mc/lod_frac/L, L = [0, 1, 2])" in part
    assert "ΔNLL@H: mc/adv_delta_mean" in part


def test_compare_errors_and_vanilla_only(base, tmp_path):
    report = rp.get_report()
    with pytest.raises(FileNotFoundError, match="no curve file at"):
        log_curves_section(report, [str(tmp_path / "nowhere")])
    _write_curve(base / "report" / "base_train_curve.jsonl", [{"step": 1, "tokens": 10, "train_loss": 3.0}])
    other = tmp_path / "mc.jsonl"
    _write_curve(other, mc_rows(4))
    log_curves_section(report, [str(other)])
    part = mc_part(open(report.generate(copy_to=None)).read())
    assert "this run (vanilla); MC (" in part and "ΔNLL@H: mc/adv_delta_mean and p95 of MC (" in part
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "scripts.mc_curves", "--compare", str(tmp_path / "nope")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no curve file at" in r.stderr, r.stderr  # die(): one line, no traceback
    # the old spelling still works for one release: it runs scripts.mc_curves first, with a warning
    r = subprocess.run([sys.executable, "-m", "nanochat.report", "generate", "--compare", str(other)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "deprecated" in r.stderr, r.stderr
    assert "this run (vanilla); MC (" in mc_part((base / "report" / "report.md").read_text())


def test_plots_skipped_loudly_without_matplotlib(base, monkeypatch, capsys):
    report = rp.get_report()
    _write_curve(base / "report" / "base_train_curve.jsonl", mc_rows(4))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    log_curves_section(report)
    md = open(report.generate(copy_to=None)).read()
    assert md.count("plots skipped: matplotlib is not installed") == 2  # loss curves and MC curves
    assert "![" not in md
    assert "plots skipped" in capsys.readouterr().err
