"""
argparse `type=` functions shared by the scripts, so that a bad value fails at parse time with argparse's
one line `error: argument --depth: must be an integer >= 1, got '0'` (exit code 2), before any data or
model is loaded, instead of a traceback from deep inside training or after a model has loaded.

    positive_int        sizes and counts: >= 1
    nonneg_int          counts where 0 means "none"/"off": >= 0
    int_or_off(off)     positive int, or the flag's "off"/"auto" sentinel (e.g. -1 = derive it)
    nonneg_int_or_off   the same with 0 allowed
    finite_float        any finite number (rejects nan/inf)
    nonneg_float        finite and >= 0 (learning rates, ratios)
    positive_float      finite and > 0 (e.g. epochs)
    temperature         finite and >= 0 (0 = greedy)
    top_k               int >= 0 (0 = all tokens)
    port                TCP port 1..65535
    model_tag           a checkpoint folder name: letters, digits, '_', '-', '.'; no '..', no path separator;
                        '' stays '' (= the script's default tag)

Tags are also confined where the checkpoint folder is built (checkpoint_manager.tag_dir), so a tag that
reaches the library without passing through argparse cannot escape $NANOCHAT_BASE_DIR either.
"""

import argparse
import math
import re

TAG_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
MAX_TAG_LEN = 128  # a folder name, not a path; far below any filesystem's limit


def _int(text) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonneg_int(text) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def int_or_off(off=-1, minimum=1):
    """Type for a flag whose value is an int >= minimum or the sentinel `off` (its default: 'derive it')."""

    def check(text) -> int:
        value = _int(text)
        if value != off and value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, or {off} (the default: off/auto), "
                                             f"got {text!r}")
        return value

    check.__name__ = f"int_or_{off}"
    return check


positive_int_or_off = int_or_off(-1, 1)
nonneg_int_or_off = int_or_off(-1, 0)


def finite_float(text) -> float:
    return _float(text)


def nonneg_float(text) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def positive_float(text) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def temperature(text) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a temperature must be >= 0 (0 = greedy), got {text!r}")
    return value


def top_k(text) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"top-k must be >= 0 (0 = all tokens), got {text!r}")
    return value


def port(text) -> int:
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port must be in 1..65535, got {text!r}")
    return value


def tag_problem(tag: str) -> str | None:
    """Why `tag` is not a safe checkpoint folder name, or None if it is."""
    if not TAG_RE.match(tag):
        return "use only letters, digits, '_', '-' and '.' (no '/', '\\' or spaces)"
    if ".." in tag or tag.startswith("."):
        return "it must not start with '.' or contain '..'"
    if len(tag) > MAX_TAG_LEN:
        return f"at most {MAX_TAG_LEN} characters"
    return None


def model_tag(text) -> str:
    tag = str(text)
    if tag == "":
        return tag
    problem = tag_problem(tag)
    if problem:
        raise argparse.ArgumentTypeError(f"model tag {tag!r} is not a plain folder name: {problem}")
    return tag
