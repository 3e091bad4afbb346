"""dev/wandb_dashboard.json: every metric it plots is one our trainer really logs, the x-axis is the tokens
key, the template validates, and scripts.wandb_dashboard maps it onto wandb_workspaces (a fake module set
always; the real package when installed) or fails clearly without the package."""

import json
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from mc.config import MCConfig
from mc.train.controller import MCController

try:  # the trainer's MC step moved to mc/train/train_step.py
    from mc.train.train_step import MCTrainStep
except ImportError:
    from mc.train.controller import MCTrainStep
from mc.modules import MCModules
from nanochat.gpt import GPT, GPTConfig
from scripts import wandb_dashboard as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS_KEY = "train/tokens"  # what base_train logs as cumulative tokens seen, in every wandb_run.log call


def base_train_literal_metrics() -> set[str]:
    """W&B keys written as string literals in scripts/base_train.py (train/*, val/*, core_metric)."""
    with open(os.path.join(ROOT, "scripts", "base_train.py"), encoding="utf-8") as f:
        src = f.read()
    return set(re.findall(r"[\"']((?:train|val)/[\w/]+)[\"']", src)) | set(re.findall(r"[\"'](core_metric)[\"']", src))


@pytest.fixture(scope="module")
def mc_logged_metrics():
    """The mc/* keys MCTrainStep.log really returns for W&B: one tiny MC step on CPU (max_lod 2 so all
    three levels of detail appear)."""
    torch.manual_seed(0)
    T = 160
    model = GPT(GPTConfig(sequence_len=T, vocab_size=97, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    cfg = MCConfig(block_size=4, train_wc_length=56, recent_tokens=8, num_random_variants=2,
                   wc_anneal_start_frac=0.5, gistnet_layers=1)
    mods = MCModules.from_config(cfg, 32)
    step = MCTrainStep(MCController(model, mods, cfg, total_steps=10), rows_per_step=2, B=2, rank=0,
                       world_size=1, report_dir="unused")
    x = torch.randint(0, 97, (2, T + 1))
    step(x[:, :-1], x[:, 1:], 0, 0, True)
    metrics, _ = step.log(1, step_ms=10.0, grad_accum_steps=1)
    return set(metrics)


def test_template_validates_and_x_axis_is_tokens():
    dash = wd.load_dashboard()
    assert dash["name"] == "MC vs Baseline (Tokens)"
    assert dash["x_axis"] == TOKENS_KEY
    assert all(x == TOKENS_KEY for _, _, x, _ in wd.panels(dash)), "every panel must plot against tokens"
    assert TOKENS_KEY in base_train_literal_metrics()
    # seed 001's four panels
    titles = [t for _, t, _, _ in wd.panels(dash)]
    for t in ("Training loss vs tokens", "Validation bpb vs tokens", "Grad accumulation", "Throughput"):
        assert t in titles
    assert dash["group_by"] == {"config": "mc_enabled"}


def test_every_referenced_metric_is_logged(mc_logged_metrics):
    logged = base_train_literal_metrics() | mc_logged_metrics
    missing = sorted(wd.referenced_metrics(wd.load_dashboard()) - logged)
    assert not missing, f"dev/wandb_dashboard.json plots metrics nothing logs: {missing}"
    assert {"mc/lod_loss/0", "mc/lod_loss/1", "mc/lod_loss/2", "mc/adv_delta_mean"} <= mc_logged_metrics


def test_group_by_key_is_a_base_train_flag():
    from scripts.base_train import build_parser

    dests = {a.dest for a in build_parser()._actions}
    assert wd.load_dashboard()["group_by"]["config"] in dests  # W&B config = vars(args)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("x_axis"), "missing top-level field 'x_axis'"),
    (lambda d: d["sections"][0]["panels"][0].update(y=[]), "y must be a non-empty list"),
    (lambda d: d["sections"][0]["panels"][0].update(colour="red"), "unknown field"),
    (lambda d: d.update(group_by={"tag": "x"}), "group_by must be"),
    (lambda d: d["sections"][1].update(panels=[]), r"sections\[1\] needs a name"),
])
def test_bad_templates_are_named(tmp_path, mutate, message):
    dash = json.load(open(wd.DEFAULT_PATH, encoding="utf-8"))
    mutate(dash)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dash))
    with pytest.raises(wd.DashboardError, match=message):
        wd.load_dashboard(str(path))


class _Rec:
    """Stand-in for a wandb_workspaces class: records its keyword arguments."""

    def __init__(self, kind, **kw):
        self.kind, self.kw = kind, kw


def fake_modules():
    mk = lambda kind: (lambda *a, **kw: _Rec(kind, args=a, **kw))
    ws = SimpleNamespace(Workspace=mk("Workspace"), Section=mk("Section"), WorkspaceSettings=mk("Settings"),
                         RunsetSettings=mk("Runset"), Config=mk("Config"))
    return ws, SimpleNamespace(LinePlot=mk("LinePlot"))


def test_build_workspace_mapping():
    dash = wd.load_dashboard()
    ws, wr = fake_modules()
    w = wd.build_workspace(dash, "me", "nanochat", ws, wr)
    assert w.kind == "Workspace" and w.kw["entity"] == "me" and w.kw["project"] == "nanochat"
    assert w.kw["name"] == "MC vs Baseline (Tokens)" and w.kw["settings"].kw["x_axis"] == TOKENS_KEY
    assert w.kw["runset_settings"].kw["groupby"][0].kw["args"] == ("mc_enabled",)
    sections = w.kw["sections"]
    assert [s.kw["name"] for s in sections] == [s["name"] for s in dash["sections"]]
    plots = [p for s in sections for p in s.kw["panels"]]
    assert len(plots) == sum(len(s["panels"]) for s in dash["sections"])
    assert all(p.kw["x"] == TOKENS_KEY for p in plots)
    assert plots[0].kw["y"] == ["train/loss"]


def test_build_with_real_package_when_installed():
    pytest.importorskip("wandb_workspaces")
    ws, wr = wd.import_workspaces()
    w = wd.build_workspace(wd.load_dashboard(), "me", "nanochat", ws, wr)
    assert w.settings.x_axis == TOKENS_KEY and len(w.sections) == 2
    w._to_model()  # serialises offline (save() is the only network call)


def test_cli_dry_run_and_missing_package(monkeypatch, capsys):
    assert wd.main(["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "x = train/tokens" in out and "Training loss vs tokens: train/loss" in out
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    assert wd.main(["--project", "p"]) == 1
    assert "--entity" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.workspaces", None)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)
    assert wd.main(["--entity", "me"]) == 1
    err = capsys.readouterr().err
    assert "wandb-workspaces" in err and "pip install" in err


def test_ops_note_lists_the_panels():
    text = open(os.path.join(ROOT, "obsidian", "ops", "W&B dashboard.md"), encoding="utf-8").read()
    assert "python -m scripts.wandb_dashboard" in text and "train/tokens" in text
    for _, title, _, _ in wd.panels(wd.load_dashboard()):
        assert title in text, f"panel {title!r} is not described in obsidian/ops/W&B dashboard.md"
