"""The architecture notes must not drift from the mc/ code.

(1) every mc module (mc/*.py and mc/<room>/*.py, not __init__.py) has a note: obsidian/architecture/mc/<module>.md,
    or its file name (`mc/<module>.py`, `mc/<room>/<module>.py`, or a `mc/eval/*.py` wildcard for the eval
    modules) appears in a note directly
    in obsidian/architecture/ (Telemetry, mc_eval, Inference session, ... describe several modules each);
(2) in each obsidian/architecture/mc/<module>.md, the identifiers of inline code spans exist in the code:
    every `name(` / `a.b.name(` call, and every span that is just `module.name` / `Class.attr`, resolves
    (rules in resolves()); where the parentheses list plain names (`f(x, y, step=...)`), each is a
    parameter of the real signature;
(3) every `--flag` in those notes (prose included) is a flag of mc.config.FLAGS / scripts.base_train, or
    of one of our commands (tests/test_docs_flags.py's parsers; that test also checks these notes' code spans);
(4) each note starts with a title and a one-line summary linking back to [[MC training]], has 30-90 lines,
    and its [[wiki links]] resolve to notes of the vault (so do those of obsidian/README.md, which lists
    every module note, and of MC training.md's module table).
Math goes in fenced blocks, which (2) does not read.
"""

import builtins
import dataclasses
import glob
import importlib
import inspect
import os
import re

from tests.test_docs_flags import FLAG_RE, _build_parser, _parser_options, command_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = os.path.join(ROOT, "obsidian", "architecture")
MC_NOTES = os.path.join(ARCH, "mc")
VAULT = os.path.join(ROOT, "obsidian")

ROOMS = ("train", "infer", "eval", "ops")  # mc's subpackages (the core sits at the top of mc/)
# module stem -> its file, relative to the repo (stems are unique across the rooms, so notes are named by stem)
MC_FILES = {os.path.basename(p)[:-3]: os.path.relpath(p, ROOT)
            for p in glob.glob(os.path.join(ROOT, "mc", "*.py")) + glob.glob(os.path.join(ROOT, "mc", "*", "*.py"))
            if not p.endswith("__init__.py")}
MC_STEMS = sorted(MC_FILES)
assert len(MC_STEMS) == len(glob.glob(os.path.join(ROOT, "mc", "**", "*.py"), recursive=True)) - 1 - len(ROOMS), \
    "two mc modules share a file name: the architecture notes are named by stem, so stems must be unique"


def mc_module(stem: str):
    return importlib.import_module(MC_FILES[stem][:-3].replace("/", "."))
# prefixes of names that are not ours to check (the GPT, torch, numpy, ...)
FOREIGN = {"torch", "F", "nn", "np", "numpy", "math", "dist", "os", "GPT", "model", "dataclasses", "argparse"}

FENCE_RE = re.compile(r"^(\s*)(```|~~~)[^\n]*\n.*?^\1?\2\s*$", re.M | re.S)
SPAN_RE = re.compile(r"`([^`]+?)`")  # inline code; may continue over a soft line break
CALL_RE = re.compile(r"(?<![\w.])((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\(")
DOTTED_RE = re.compile(r"^(?:mc\.)?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$")
PARAM_RE = re.compile(r"^\*{0,2}([A-Za-z_]\w*)\s*(?:=.*)?$")
WIKI_RE = re.compile(r"\[\[([^\]|#\\]+)(?:#[^\]|]*)?(?:\\?\|[^\]]*)?\]\]")


def mc_notes() -> list[str]:
    return sorted(glob.glob(os.path.join(MC_NOTES, "*.md")))


def inline_spans(text: str) -> list[str]:
    """Contents of inline code spans outside fenced blocks (a span never crosses a blank line)."""
    return [s.replace("\n", " ") for s in SPAN_RE.findall(FENCE_RE.sub("", text)) if "\n\n" not in s]


# ------------------------------------------------------------------ resolving names
def _classes(mod) -> list[type]:
    """Classes defined in or imported into the module (so `MCController.commit_step` resolves in train_step)."""
    return [v for v in vars(mod).values() if inspect.isclass(v) and (v.__module__ or "").startswith(("mc.", mod.__name__))]


def _member(obj, name: str):
    """obj.name, also for dataclass fields and attributes assigned as self.name in the class's source;
    None when it does not exist (a sentinel 'field' for non-class-attribute members)."""
    if hasattr(obj, name):
        return getattr(obj, name)
    if inspect.isclass(obj):
        if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
            return "field"
        try:
            src = inspect.getsource(obj)
        except (OSError, TypeError):
            return None
        if re.search(rf"\bself\.{re.escape(name)}\b\s*(?:=|,[^=\n]*=)", src):
            return "field"
    return None


def _chain(obj, parts):
    for p in parts:
        obj = _member(obj, p)
        if obj is None:
            return None
    return obj


def resolves(dotted: str, mod) -> list:
    """The objects `dotted` may name, from the note of module `mod` ([] = unknown). Rules, any may match:
    (a) `mc.x.y` / `x.y` with x an mc module stem: attribute chain y on mc.x;
    (b) an attribute chain on the note's module (its functions, classes, imports);
    (c) `A.y` with A a class of any mc module: y on A;
    (d) the last name is a member of a class defined in / imported into the note's module (instance
        methods written as `cfg.wc_length(...)` or a bare `append(...)`);
    (e) builtins (`float(`, `bool(`)."""
    parts = dotted.split(".")
    forced = parts[0] == "mc" and len(parts) > 1
    if forced:
        parts = parts[1:]
        if parts[0] in ROOMS and len(parts) > 1:  # mc.train.controller.X
            parts = parts[1:]
    found = []
    if parts[0] in MC_STEMS and (len(parts) > 1 or forced):
        found.append(_chain(mc_module(parts[0]), parts[1:]))
    if forced:
        return [f for f in found if f is not None]
    found.append(_chain(mod, parts))
    if len(parts) > 1:
        for stem in MC_STEMS:
            other = mc_module(stem)
            cls = vars(other).get(parts[0])
            if inspect.isclass(cls):
                found.append(_chain(cls, parts[1:]))
    found += [_member(cls, parts[-1]) for cls in _classes(mod)]
    if len(parts) == 1 and hasattr(builtins, parts[0]):
        found.append(getattr(builtins, parts[0]))
    return [f for f in found if f is not None]


def _paren_args(span: str, start: int) -> str | None:
    """Text between the '(' at span[start] and its matching ')' (None if unbalanced in the span)."""
    depth = 0
    for i in range(start, len(span)):
        depth += {"(": 1, ")": -1}.get(span[i], 0)
        if depth == 0:
            return span[start + 1: i]
    return None


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _signature_ok(obj, names: list[str]) -> bool:
    if inspect.isbuiltin(obj) or any(obj is v for v in vars(builtins).values()):
        return True  # `len(row_ids)`: an expression about the arguments, not a signature
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return True  # builtins without a signature: nothing to compare
    kinds = {p.kind for p in sig.parameters.values()}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return True
    return all(n in sig.parameters for n in names)


def identifier_problems(note: str) -> list[str]:
    stem = os.path.basename(note)[:-3]
    mod = mc_module(stem)
    with open(note, encoding="utf-8") as f:
        spans = inline_spans(f.read())
    bad = []
    for span in spans:
        checks = [(m.group(1), m.end(1)) for m in CALL_RE.finditer(span)]
        if DOTTED_RE.match(span.strip()):
            checks.append((span.strip(), None))
        for name, paren in checks:
            first = name.split(".")[0]
            if first in FOREIGN or len(name) == 1:
                continue  # not ours, or math (`B(1+N)`)
            objs = resolves(name, mod)
            if not objs:
                if "." in name and first not in MC_STEMS and first != "mc" and paren is None:
                    continue  # `model.mc_modules`-style prose about instances: nothing to resolve
                bad.append(f"`{name}` (in `{span[:80]}`) is not in mc.{stem} (or the mc module/class it names)")
                continue
            if paren is None:
                continue
            inner = _paren_args(span, paren)
            if inner is None or not inner.strip():
                continue
            items = [x.strip() for x in _split_top(inner)]
            items = [x for x in items if x not in ("...", "…", "")]
            params = [PARAM_RE.match(x) for x in items]
            if not all(params):
                continue  # an expression, not a parameter list: existence was enough
            names = [m.group(1) for m in params]
            callables = [o for o in objs if callable(o)]
            if callables and not any(_signature_ok(o, names) for o in callables):
                bad.append(f"`{name}({inner})`: parameter(s) not in the signature of {name}")
    return bad


# ------------------------------------------------------------------ the tests
def test_every_mc_module_has_a_note():
    top_notes = ""
    for path in glob.glob(os.path.join(ARCH, "*.md")):
        with open(path, encoding="utf-8") as f:
            top_notes += f.read()
    missing = []
    for stem in MC_STEMS:
        if os.path.exists(os.path.join(MC_NOTES, f"{stem}.md")):
            continue
        wildcard = "mc/eval/*.py" if MC_FILES[stem].startswith("mc/eval/") else None
        if MC_FILES[stem] in top_notes or (wildcard and wildcard in top_notes):
            continue
        missing.append(MC_FILES[stem])
    assert not missing, ("modules without an architecture note (write obsidian/architecture/mc/<module>.md, or "
                         "describe the module, by file name, in a note of obsidian/architecture/): " + ", ".join(missing))


def test_note_identifiers_exist_in_the_code():
    notes = mc_notes()
    assert notes, "no notes in obsidian/architecture/mc/"
    bad = {}
    for note in notes:
        stem = os.path.basename(note)[:-3]
        assert stem in MC_STEMS, f"{os.path.relpath(note, ROOT)} names no mc module {stem}.py"
        problems = identifier_problems(note)
        if problems:
            bad[os.path.relpath(note, ROOT)] = problems
    assert not bad, "architecture notes name code that does not exist (fix the note, or the code):\n" + \
        "\n".join(f"  {path}:\n" + "\n".join(f"    {p}" for p in items) for path, items in sorted(bad.items()))


def test_note_flags_exist():
    from mc.config import FLAGS

    # the parsers these notes talk about, built in-process; any other command only if a flag is not found here
    known = {flag for _, flag, _, _ in FLAGS}
    for module in ("scripts.base_train", "scripts.mc_eval"):
        known |= _parser_options(_build_parser(module))
    bad = {}
    for note in mc_notes():
        with open(note, encoding="utf-8") as f:
            text = f.read()
        for flag, star in FLAG_RE.findall(text):
            if star or flag.endswith(("_", "-")):
                continue  # `--mc_*`, `--lensnet_`: families, not flags
            if flag not in known and flag not in set().union(*command_options().values()):
                bad.setdefault(os.path.relpath(note, ROOT), set()).add(flag)
    assert not bad, f"flags in the architecture notes that no command accepts: {bad}"


def _vault_notes() -> list[str]:
    return [os.path.relpath(p, VAULT)[:-3] for p in glob.glob(os.path.join(VAULT, "**", "*.md"), recursive=True)]


def _link_resolves(target: str, notes: list[str]) -> bool:
    """Obsidian's rule, simplified: a vault path, or a path suffix / basename of one note."""
    target = target.strip().removesuffix(".md")
    return any(n == target or n.endswith("/" + target) for n in notes)


def test_note_shape_and_links():
    notes = _vault_notes()
    bad = []
    for note in mc_notes():
        rel = os.path.relpath(note, ROOT)
        with open(note, encoding="utf-8") as f:
            text = f.read()
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            bad.append(f"{rel}: must start with a '# ' title")
        summary = text.split("\n\n")[1] if text.count("\n\n") else ""
        if "[[MC training]]" not in summary:
            bad.append(f"{rel}: the one-line summary after the title must link back to [[MC training]]")
        if not 30 <= len(lines) <= 90:
            bad.append(f"{rel}: {len(lines)} lines (keep a module note to 30-90: a map, not the docstring)")
        for target in WIKI_RE.findall(text):
            if not _link_resolves(target, notes):
                bad.append(f"{rel}: [[{target}]] matches no note of the vault")
    for index in (os.path.join(VAULT, "README.md"), os.path.join(ARCH, "MC training.md")):  # the notes' indexes
        with open(index, encoding="utf-8") as f:
            targets = WIKI_RE.findall(f.read())
        bad += [f"{os.path.relpath(index, ROOT)}: [[{t}]] matches no note of the vault"
                for t in targets if not _link_resolves(t, notes)]
        if index.endswith("README.md"):
            bad += [f"obsidian/README.md does not list architecture/mc/{os.path.basename(n)[:-3]}"
                    for n in mc_notes() if f"[[architecture/mc/{os.path.basename(n)[:-3]}" not in "".join(
                        f"[[{t}" for t in targets)]
    assert not bad, "\n".join(bad)


def test_resolution_rules():
    """The checker itself: real names pass, drifted ones fail."""
    import mc.train.train_step as ts
    import mc.tree as tree

    assert resolves("MegaContextTree.append", tree) and resolves("variants.duplicate_weights", tree)
    assert resolves("MCController.process_batch", ts) and resolves("MCResult.horizon_nll", ts)
    assert resolves("append", tree) and resolves("float", tree)
    assert not resolves("MegaContextTree.extend", tree) and not resolves("variants.no_such_thing", tree)
    assert not resolves("mc.tree.append", tree)
    assert _signature_ok(tree.MegaContextTree.append, ["embeddings"])
    assert not _signature_ok(tree.MegaContextTree.append, ["lod0"])
    assert inline_spans("a `f(x,\ny)` b\n```\n`g(z)`\n```\n") == ["f(x, y)"]


def test_the_map_lists_every_module():
    """obsidian/architecture/Map.md: one line per module under its folder's line, none missing, none stale."""
    with open(os.path.join(ARCH, "Map.md"), encoding="utf-8") as f:
        block = f.read().split("```")[1]
    listed, folder = set(), None
    for line in block.splitlines():
        if re.match(r"^[a-z_/]+/\s", line + " "):
            folder = line.split()[0].rstrip("/")
        elif re.match(r"^  [a-z0-9_]+\.py\s", line):
            listed.add(f"{folder}/{line.split()[0]}")
    folders = ["nanochat", "tasks", "mc", *(f"mc/{r}" for r in ROOMS), "scripts", "dev"]
    code = {os.path.relpath(p, ROOT) for d in folders for p in glob.glob(os.path.join(ROOT, d, "*.py"))
            if not p.endswith("__init__.py")}
    assert not code - listed, f"modules missing from obsidian/architecture/Map.md: {sorted(code - listed)}"
    assert not listed - code, f"Map.md lists modules that do not exist: {sorted(listed - code)}"
