"""The docs must not drift from the command lines.

(a) every `--flag` in an inline code span or a fenced code block of obsidian/**/*.md and README.md
    that belongs to one of our commands (Python entrypoints below, the shell recipes) is accepted by at
    least one of their parsers. Flags of other tools (torchrun, uv, pytest, ...) are skipped: a flag is
    attributed to the most recent command word before it on the same line.
(b) every MegaContext flag of scripts.base_train (--mc_*, --allocator_*, --gistnet_*, --lensnet_*, from
    mc.config.add_mc_flags) is documented in obsidian/ops/Training & Operations.md.

Parsers: a module's zero-argument build_parser() when it has one (scripts.mid_train: build_parser("mid",
...)), otherwise the option lines of `python -m <module> --help` (run in parallel, cached per session).
Shell recipes: the option patterns of their `case` arms.
"""

import argparse
import functools
import glob
import importlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS_DOC = os.path.join(ROOT, "obsidian", "ops", "Training & Operations.md")

SCRIPTS = ["base_train", "tok_train", "tok_eval", "base_loss", "base_eval", "mid_train", "chat_sft", "chat_rl",
           "chat_eval", "chat_cli", "chat_web", "mc_eval", "mc_otel_preflight", "mc_bench_train", "mc_bench",
           "wandb_dashboard", "recall_bench", "bad_cli", "web_fuzz", "mc_recall", "memory_plan"]
MODULES = [f"scripts.{s}" for s in SCRIPTS] + ["nanochat.dataset", "nanochat.report"]
# shell recipes -> the files whose `case` arms parse their options
SHELL = {"run10.sh": ["run10.sh"], "speedrun.sh": ["speedrun.sh", "dev/recipe_common.sh"],
         "run1000.sh": ["run1000.sh", "dev/recipe_common.sh"], "mc_setup": ["mc_setup"]}
# command words of other tools: their flags are not ours to check
FOREIGN = {"uv", "pip", "pip3", "pytest", "ruff", "torchrun", "git", "wandb", "docker", "curl", "wget", "nvidia-smi",
           "maturin", "cargo", "rustup", "npm", "npx", "ssh", "rsync", "tmux", "screen", "ls", "tail", "grep", "sed",
           "find", "apt-get", "apt", "conda", "huggingface-cli", "hf", "test.sh", "kill", "du", "df", "tar"}
# `--flag`-looking text that is a placeholder, not a flag
PLACEHOLDERS = {"--key", "--flag"}
MC_PREFIXES = ("--mc_", "--allocator_", "--gistnet_", "--lensnet_")

FLAG_RE = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)(\*?)")
OURS_RE = re.compile(r"(?:^|[\s/(\[])(?:scripts[./](\w+)|nanochat[./](dataset|report)\b|(run10\.sh|speedrun\.sh|"
                     r"run1000\.sh|mc_setup)\b)")


def _parser_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def _help_options(module: str) -> set[str]:
    """Long options of the option lines of `python -m module --help`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"`python -m {module} --help` failed:\n{r.stderr[-2000:]}"
    opts = set()
    for line in r.stdout.splitlines():
        if re.match(r"^\s+-", line):
            opts.update(re.findall(r"--[\w-]+", re.split(r"(?<=\S)\s{2,}", line.strip(), maxsplit=1)[0]))
    return opts


def _has_build_parser(module: str) -> bool:
    """Whether the module defines build_parser (read from its source, so --help runs can start before imports)."""
    with open(os.path.join(ROOT, *module.split(".")) + ".py", encoding="utf-8") as f:
        return re.search(r"^def build_parser\(", f.read(), flags=re.M) is not None


def _build_parser(module: str) -> argparse.ArgumentParser:
    mod = importlib.import_module(module)
    if module == "scripts.mid_train":
        return mod.build_parser("mid", mod.add_mixture_flags)
    return mod.build_parser()


def _shell_options(files: list[str]) -> set[str]:
    opts = set()
    for rel in files:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            for line in f:
                m = re.match(r"^\s*([-\w|=*]+)\)", line)  # a `case` arm: --gpu) / --gpu=*) / -h|--help)
                if m:
                    opts.update(re.findall(r"--[\w-]+", m.group(1)))
    return opts


@functools.cache
def command_options() -> dict[str, set[str]]:
    """{command name: long options it accepts}, Python modules and shell recipes."""
    need_help = [m for m in MODULES if not _has_build_parser(m)]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(need_help)))) as pool:
        helps = pool.map(_help_options, need_help)  # subprocesses run while the others are imported here
        out = {m: _parser_options(_build_parser(m)) for m in MODULES if m not in need_help}
        out.update(zip(need_help, helps))
    for name, files in SHELL.items():
        out[name] = _shell_options(files)
    return out


def doc_files() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "obsidian", "**", "*.md"), recursive=True)) + \
        [os.path.join(ROOT, "README.md")]


def code_lines(text: str) -> list[str]:
    """Lines of fenced code blocks (continuations joined) and the contents of inline code spans."""
    out = []
    fence = re.compile(r"^(\s*)(```|~~~)[^\n]*\n(.*?)^\1?\2\s*$", re.M | re.S)
    for m in fence.finditer(text):
        out += m.group(3).replace("\\\n", " ").splitlines()
    rest = fence.sub("", text)
    out += [m.group(1) for m in re.finditer(r"`([^`\n]+)`", rest)]
    return [line.replace("\\|", "|") for line in out]


def _owner(word: str) -> str | None:
    """'ours:<name>' / 'foreign' / None for one shell word."""
    m = OURS_RE.search(" " + word)
    if m:
        if m.group(1):
            return f"scripts.{m.group(1)}"
        return f"nanochat.{m.group(2)}" if m.group(2) else m.group(3)
    base = os.path.basename(word.strip("[]()"))
    return "foreign" if base in FOREIGN else None


def doc_flags(line: str) -> list[tuple[str, str | None]]:
    """(flag, owning command or None) for every checkable --flag in one code line; foreign and wildcard
    flags (`--mc_*`, `--lensnet_`) are dropped."""
    out, owner = [], None
    for word in re.split(r"\s+", line):
        if word in ("&&", ";", "|", "||", "#"):
            owner = None
            continue
        who = _owner(word)
        if who is not None:
            owner = who
        for flag, star in FLAG_RE.findall(word):
            if owner == "foreign" or star or flag.endswith(("_", "-")) or flag in PLACEHOLDERS:
                continue
            out.append((flag, owner))
    return out


def test_documented_flags_exist():
    opts = command_options()
    known = set().union(*opts.values())
    bad = {}
    for path in doc_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for line in code_lines(text):
            for flag, owner in doc_flags(line):
                name = flag.split("=")[0]
                if name not in known:
                    bad.setdefault(os.path.relpath(path, ROOT), set()).add(
                        f"{name} (in `{line.strip()[:90]}`{', after ' + owner if owner else ''})")
    assert not bad, "flags in the docs that none of our commands accept (fix the doc, or the script):\n" + \
        "\n".join(f"  {path}:\n" + "\n".join(f"    {x}" for x in sorted(items)) for path, items in sorted(bad.items()))


def test_mc_flags_documented_in_ops_doc():
    from mc.config import add_mc_flags

    flags = sorted(f for f in _parser_options(add_mc_flags(argparse.ArgumentParser())) if f.startswith(MC_PREFIXES))
    assert flags, "add_mc_flags added no --mc_*/--allocator_*/--gistnet_*/--lensnet_* flags?"
    with open(OPS_DOC, encoding="utf-8") as f:
        doc = f.read()
    missing = [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", doc)]
    assert not missing, (f"{len(missing)} MegaContext flag(s) of scripts.base_train (mc.config.add_mc_flags) are not "
                         f"documented in {os.path.relpath(OPS_DOC, ROOT)} (section 4b): " + ", ".join(missing))


def test_mc_flags_are_base_train_flags():
    """(b) reads add_mc_flags; make sure that is what scripts.base_train actually accepts."""
    from mc.config import add_mc_flags

    mc = {f for f in _parser_options(add_mc_flags(argparse.ArgumentParser())) if f.startswith(MC_PREFIXES)}
    assert mc <= command_options()["scripts.base_train"]


def test_doc_flag_extraction():
    assert doc_flags("torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth=12") == \
        [("--depth", "scripts.base_train")]
    assert doc_flags("uv run pytest --maxfail=1 && bash run10.sh --gpu cpu") == [("--gpu", "run10.sh")]
    assert doc_flags("--mc_* and --lensnet_ and --key=value") == []
    assert doc_flags("./mc_setup [--dev] [--otel]") == [("--dev", "mc_setup"), ("--otel", "mc_setup")]
    assert code_lines("a `x --y` b\n```bash\nfoo \\\n  --bar\n```\n") == ["foo    --bar", "x --y"]
