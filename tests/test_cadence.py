"""
The cadence rule (nanochat/cadence.py): a bare integer counts optimizer steps as upstream nanochat, a
count with a unit counts tokens, -1/0 = off; base_train/mid_train turn either into a token interval
(steps × tokens per step) and chat_rl checks the unit it was given. The end-to-end check (a tiny
base_train run with --eval_every=2 evaluates at steps 0, 2, 4) is in tests/test_base_train.py.
"""

import argparse
import types

import pytest

from nanochat.cadence import Cadence, describe, parse_cadence, to_token_intervals
from nanochat.training import crossed


@pytest.mark.parametrize("text, cadence", [
    ("250", Cadence(250, "steps")),
    ("+7", Cadence(7, "steps")),
    ("1_000", Cadence(1000, "steps")),
    ("-1", Cadence(-1, "steps")),
    ("0", Cadence(0, "steps")),
    ("4M", Cadence(4_000_000, "tokens")),
    ("500K", Cadence(500_000, "tokens")),
    ("500k", Cadence(500_000, "tokens")),
    ("1.5B", Cadence(1_500_000_000, "tokens")),
    ("2G", Cadence(2_000_000_000, "tokens")),
    ("4Mtok", Cadence(4_000_000, "tokens")),
    ("131072tok", Cadence(131072, "tokens")),
    (" 64K ", Cadence(64_000, "tokens")),
])
def test_parse_rule(text, cadence):
    assert parse_cadence(text) == cadence


@pytest.mark.parametrize("text", ["lots", "", "1.5", "12Q", "tok", "2.5tok", "M", "1e6", "4 steps"])
def test_parse_refuses_with_the_rule(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"optimizer steps \(250, as upstream nanochat\)"):
        parse_cadence(text)


def test_token_interval_is_steps_times_tokens_per_step():
    assert parse_cadence("250").tokens(524288) == 250 * 524288
    assert parse_cadence("4M").tokens(524288) == 4_000_000  # a token count ignores the step size
    assert parse_cadence("131072tok").tokens(8192) == 131072
    assert parse_cadence("-1").tokens(524288) == -1  # off stays the flag's off value
    assert parse_cadence("0").tokens(524288) == 0
    # steps N × tokens/step fires exactly where upstream's `step % N == 0` does
    every = parse_cadence("3").tokens(512)
    fired = [s for s in range(20) if crossed((s - 1) * 512 if s else -1, s * 512, every)]
    assert fired == [s for s in range(20) if s % 3 == 0]


def test_spelling_roundtrips_and_describes():
    for text in ("250", "-1", "4000000tok"):
        assert str(parse_cadence(text)) == text
    assert parse_cadence(str(parse_cadence("4M"))) == parse_cadence("4M")
    assert describe(parse_cadence("250"), 1000) == "250 steps (250,000 tokens)"
    assert describe(parse_cadence("5K"), 1000) == "5,000 tokens (5 steps)"
    assert describe(parse_cadence("-1"), 1000) == "off"


def test_to_token_intervals_rewrites_args_in_place():
    args = types.SimpleNamespace(eval_every=parse_cadence("2"), save_every=parse_cadence("-1"),
                                 sample_every=parse_cadence("1M"), log_every=81920)
    line = to_token_intervals(args, 512)
    assert (args.eval_every, args.save_every, args.sample_every, args.log_every) == (1024, -1, 1_000_000, 81920)
    assert line == "cadences: eval_every 2 steps (1,024 tokens), sample_every 1,000,000 tokens (1,953 steps), save_every off"
    assert to_token_intervals(args, 512) == "cadences: "  # already converted: nothing to do


def test_due_keeps_the_unit_for_steps_of_varying_size():
    steps = parse_cadence("2")
    toks = parse_cadence("1K")
    # (steps before, after, tokens before, after) for 4 steps of 700, 100, 900, 50 tokens, starting fresh
    walk = [(-1, 0, -1, 0), (0, 1, 0, 700), (1, 2, 700, 800), (2, 3, 800, 1700), (3, 4, 1700, 1750)]
    assert [steps.due(*w) for w in walk] == [True, False, True, False, True]
    assert [toks.due(*w) for w in walk] == [True, False, False, True, False]
    assert not parse_cadence("-1").due(-1, 0, -1, 0)


def test_trainer_parsers_use_the_rule():
    from scripts.base_train import build_parser as base_parser
    from scripts.chat_rl import build_parser as rl_parser
    from scripts.mid_train import build_parser as mid_parser

    a = base_parser().parse_args(["--eval_every=50", "--core_metric_every=2000", "--sample_every=4M"])
    assert (a.eval_every, a.core_metric_every, a.sample_every, a.save_every) == \
        (Cadence(50, "steps"), Cadence(2000, "steps"), Cadence(4_000_000, "tokens"), Cadence(-1, "steps"))
    assert a.log_every == 0  # --log_every stays a plain token count (default 0 = every step)
    assert base_parser().parse_args(["--log_every=81920"]).log_every == 81920
    assert base_parser().parse_args(["--log_every=81920tok"]).log_every == 81920  # the recipes' spelling
    assert base_parser().parse_args([]).eval_every == Cadence(128_000_000, "tokens")  # defaults unchanged
    for stage in ("mid", "sft"):
        m = mid_parser(stage).parse_args(["--eval_every=150", "--save_every=8M"])
        assert (m.eval_every, m.save_every) == (Cadence(150, "steps"), Cadence(8_000_000, "tokens"))
    r = rl_parser().parse_args(["--eval_every=60", "--save_every=60"])
    assert (r.eval_every, r.save_every) == (Cadence(60, "steps"), Cadence(60, "steps"))
    assert rl_parser().parse_args([]).eval_every == Cadence(2_000_000, "tokens")
