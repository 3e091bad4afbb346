"""
Training cadences: --eval_every, --core_metric_every, --sample_every, --save_every.

The rule. A bare integer counts optimizer steps, as in upstream nanochat (--eval_every=250: steps 0,
250, 500, ...), so an upstream command line does here what it did there. A count with a unit counts
tokens: 4M, 500K, 1.5B (K/M/B powers of 10) or any count with "tok" after it (131072tok, 4Mtok).
-1 or 0 = off (each flag keeps its own meaning of off: --eval_every still evaluates the final step,
--save_every still saves it).

Why tokens inside. base_train, mid_train and chat_sft take a fixed number of tokens per optimizer
step (--total_batch_size), so either spelling becomes a token interval (steps × tokens per step) before
training starts, and the checks are one rule, crossed(tokens_before, tokens_after, every). A vanilla run
and an MC run with the same --total_batch_size then evaluate, sample and save at the same tokens
whichever way the flag was written, and checkpoint meta keeps storing token intervals, as before.
chat_rl's steps take a varying number of rollout tokens, so it keeps the unit (Cadence.due).

--log_every is ours (upstream logs every step) and stays a token count however it is written.
"""

import argparse
import re
from dataclasses import dataclass

from nanochat.common import parse_token_count
from nanochat.training import crossed

# the flags this rule covers, where a trainer has them
CADENCE_FLAGS = ("eval_every", "core_metric_every", "sample_every", "save_every")


@dataclass(frozen=True)
class Cadence:
    count: int   # <= 0: off
    unit: str    # "steps" | "tokens"

    def tokens(self, tokens_per_step: int) -> int:
        """The token interval; an off value is returned unchanged (-1 stays -1)."""
        if self.count <= 0 or self.unit == "tokens":
            return self.count
        return self.count * tokens_per_step

    def due(self, steps_before: int, steps_after: int, tokens_before: int, tokens_after: int) -> bool:
        """For steps of varying size (chat_rl): has a boundary been passed in its own unit?"""
        if self.unit == "steps":
            return crossed(steps_before, steps_after, self.count)
        return crossed(tokens_before, tokens_after, self.count)

    def __str__(self) -> str:  # the command-line spelling (reports, W&B config, checkpoint meta)
        return f"{self.count}tok" if self.unit == "tokens" and self.count > 0 else str(self.count)


def parse_cadence(value) -> Cadence:
    """argparse type: '250' = 250 steps; '4M', '500K', '1.5B', '131072tok', '4Mtok' = tokens; '-1' = off."""
    v = str(value).strip().lower().replace("_", "")
    if re.fullmatch(r"[+-]?\d+", v):
        return Cadence(int(v), "steps")
    if v.endswith("tok") or v[-1:] in ("k", "m", "b", "g"):
        try:
            return Cadence(parse_token_count(v), "tokens")
        except argparse.ArgumentTypeError:
            pass
    raise argparse.ArgumentTypeError(
        f"expected optimizer steps (250, as upstream nanochat), a token count with a unit (4M, 500K, 1.5B, "
        f"131072tok) or -1 (off), got {value!r}")


def describe(cadence: Cadence, tokens_per_step: int) -> str:
    """'250 steps (131,072,000 tokens)', '4,000,000 tokens (7.6 steps)' or 'off'."""
    if cadence.count <= 0:
        return "off"
    tokens = cadence.tokens(tokens_per_step)
    if cadence.unit == "steps":
        return f"{cadence.count:,} steps ({tokens:,} tokens)"
    return f"{tokens:,} tokens ({tokens / tokens_per_step:,.4g} steps)"


def to_token_intervals(args, tokens_per_step: int, names=CADENCE_FLAGS) -> str:
    """Replace each Cadence among args.<names> by its token interval, in place, before the run's config is
    recorded; returns one line saying what each became (a bare 50 is 50 steps, not 50 tokens)."""
    parts = []
    for name in names:
        cadence = getattr(args, name, None)
        if isinstance(cadence, Cadence):
            parts.append(f"{name} {describe(cadence, tokens_per_step)}")
            setattr(args, name, cadence.tokens(tokens_per_step))
    return "cadences: " + ", ".join(parts)
