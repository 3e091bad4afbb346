"""The ground floor: nanochat/ (the base LLM layer) does not reach up into mc/ or tasks/; and mc/'s rooms.

- every import in nanochat/*.py, at any depth of a function, is scanned: none names mc or tasks (REMAINING
  lists any still to move, each with why; it is empty and may only stay so)
- nanochat.checkpoint_manager loads an MC checkpoint as the plain GPT it contains, in a fresh interpreter
  that never imports mc, handing the "mc." state back in meta["extra_state"]; mc.infer.checkpoint attaches it
"""

import ast
import dataclasses
import json
import os
import subprocess
import sys

import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTAIRS = ("mc", "tasks")
# upward imports not moved yet: file -> the modules it still imports from upstairs
REMAINING = {}


def upward_imports(path: str) -> set:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in UPSTAIRS}


def test_nanochat_imports_nothing_from_upstairs():
    found = {}
    for name in sorted(os.listdir(os.path.join(REPO, "nanochat"))):
        if name.endswith(".py"):
            rel = f"nanochat/{name}"
            up = upward_imports(os.path.join(REPO, rel))
            if up:
                found[rel] = up
    new = {f: up - REMAINING.get(f, set()) for f, up in found.items() if up - REMAINING.get(f, set())}
    assert not new, f"nanochat/ must not import mc or tasks (the floor above): {new}"
    gone = {f for f in REMAINING if f not in found}
    assert not gone, f"{gone} no longer import upstairs: drop them from REMAINING"


# room -> the mc rooms it may import (besides itself; everything may import nanochat)
MC_ROOMS = {"core": {"core"}, "ops": {"core"}, "train": {"core", "ops"}, "infer": {"core", "ops"},
            "eval": {"core", "infer", "ops"}}


def mc_room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in MC_ROOMS else "core"


def test_mc_rooms_import_only_what_they_may():
    bad = []
    for room in MC_ROOMS:
        folder = os.path.join(REPO, "mc") if room == "core" else os.path.join(REPO, "mc", room)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for n in names:
                    if n.split(".")[0] == "tasks" or n.startswith("scripts"):
                        bad.append(f"mc/{'' if room == 'core' else room + '/'}{name} imports {n}")
                    elif n.startswith("mc.") and mc_room(n) != room and mc_room(n) not in MC_ROOMS[room]:
                        bad.append(f"mc/{'' if room == 'core' else room + '/'}{name} ({room}) imports {n} ({mc_room(n)})")
    assert not bad, "imports against mc's room rules (each room's __init__.py says what it may import):\n" + "\n".join(bad)


def test_floor_loads_an_mc_checkpoint_as_its_gpt_without_importing_mc(tiny_base_dir, tmp_path, monkeypatch):
    from mc.config import MCConfig
    from mc.infer.checkpoint import build_model
    from mc.modules import MCModules, mc_state_dict
    from nanochat.tokenizer import RustBPETokenizer

    tok = RustBPETokenizer.from_directory(str(tiny_base_dir / "tokenizer"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    cfg = MCConfig(gistnet_layers=1)
    modules = MCModules.from_config(cfg, 64)
    d = tmp_path / "base_checkpoints" / "mc"
    save_checkpoint(str(d), 1, {**model.state_dict(), **mc_state_dict(modules)}, None,
                    {"model_config": vars(model.config), "mc_config": dataclasses.asdict(cfg)})
    os.symlink(tiny_base_dir / "tokenizer", tmp_path / "tokenizer")
    probe = ("import json, sys; from nanochat.checkpoint_manager import build_model; "
             f"m, t, meta = build_model({str(d)!r}, 1, 'cpu'); "
             "print(json.dumps({'mc_imported': sorted(k for k in sys.modules if k == 'mc' or k.startswith('mc.')), "
             "'extra': sorted(meta['extra_state'])[:2], 'n_extra': len(meta['extra_state']), "
             "'has_modules': hasattr(m, 'mc_modules')}))")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mc_imported"] == [] and not out["has_modules"]
    assert out["n_extra"] == len(mc_state_dict(modules)) and all(k.startswith("mc.") for k in out["extra"])
    # the floor above attaches them
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    loaded, _, _ = build_model(str(d), 1, "cpu")
    assert loaded.mc_config == cfg
    for (k, v), (k2, v2) in zip(loaded.mc_modules.state_dict().items(), modules.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
