"""
Chat remembers: a passkey stated far back in a long conversation, asked at its end, answered through the
MegaContext inference session (mc.infer.session.MCSession, the path chat_cli --mc and chat_web --mc take).

    python -m scripts.mc_recall --model_tag d2_recall_mc                       # 50K-token histories
    python -m scripts.mc_recall --model_tag d2_recall_mc --histories 8192,50000 --probes 16 --out r.json

For each history length H and probe i: one synthetic val story of H tokens (mc_eval's probe haystack, full
of other passkeys and facts) with " The passkey for the <obj> is <value>." planted at --needle_at (a
fraction of the history; default 0.02, i.e. ~49K tokens before the question at H = 50K) and
" What is the passkey for the <obj>? " as its last tokens. The session ingests the history in user turns
of --turn_tokens tokens and refocuses after each (as MCEngine does at every user turn); the last turn ends
with the question. Then it decodes greedily; exact match = the value and the closing "." token for token.

Conditions, each a fresh session over the same ids with the same W (--mc_infer_wc_length, default 3/4 of
the GPT's sequence_len; the checkpoint's training W would not hold a 50K-token history at max LOD 2):
- keymatch  --mc_infer_focus=keymatch: the GPT's own layer-0 keys pick the blocks (mc/keymatch.py)
- lensnet   the checkpoint's LensNet + allocator (skipped when the checkpoint has none)
- fixed     no scorer: the forced collapses only (gists of the past + the raw tail)
- ORACLE    fixed focus, but the question's refocus opens the needle's blocks by ground truth
            (MCSession.refocus(block_scores=...)): what the GPT reads when focus is perfect
Reported per condition: exact match with a 95% bootstrap CI, mean entries at the answer, refocus ms,
ingest seconds. FULL attention is not a condition: H is far past the GPT's sequence_len.
"""

import argparse
import json
import time

import numpy as np
import torch

from mc.config import add_mc_flags
from mc.eval.data import probe_item
from mc.infer.checkpoint import load_model
from mc.infer.session import MCSession, MCSessionError
from mc.modules import MCModules
from nanochat import cli_checks as ck
from nanochat.common import autodetect_device_type, die

CONDITIONS = ("keymatch", "lensnet", "fixed", "ORACLE")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--source", default="base", choices=("base", "mid", "sft", "rl"), help="checkpoint stage")
    p.add_argument("--model_tag", type=ck.model_tag, default=None)
    p.add_argument("--step", type=ck.nonneg_int, default=None)
    p.add_argument("--histories", default="50000", help="comma-separated history lengths in tokens")
    p.add_argument("--probes", type=ck.positive_int, default=8, help="passkeys per history length")
    p.add_argument("--needle_at", type=float, default=0.02, help="where the passkey is stated, as a fraction of H")
    p.add_argument("--turn_tokens", type=ck.positive_int, default=4096, help="tokens per user turn (one refocus each)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="comma list of " + ", ".join(CONDITIONS))
    p.add_argument("--seed", type=int, default=0, help="probe set (mc_eval reports seed 0)")
    # W, the session's entry cap (default 3/4 of sequence_len: 384 at T = 512 holds ~300K tokens at max LOD 2;
    # the checkpoint's own W is sized for training)
    add_mc_flags(p, names=("infer_wc_length",), title="MegaContext session")
    p.add_argument("--device_type", default="", choices=["", "cuda", "cpu", "mps"])
    p.add_argument("--out", default="", help="write the numbers as JSON here")
    return p


def session_for(model, cond, W):
    """A fresh MCSession for one condition (module docstring)."""
    modules = model.mc_modules
    if cond in ("fixed", "ORACLE"):
        modules = MCModules(modules.gistnet, None)
    return MCSession(model, modules, model.mc_config, W=W, focus="keymatch" if cond == "keymatch" else "lensnet")


def needle_scores(item, n_tokens: int, bs: int) -> torch.Tensor:
    """[1, n_blocks]: +10 on the blocks that hold the needle, 0 elsewhere (ORACLE's block scores)."""
    z = torch.zeros(1, n_tokens // bs)
    for a, b in item.needles:  # ids spans; history position = ids index (BOS is position 0)
        z[0, a // bs: (b - 1) // bs + 1] = 10.0
    return z


def run_probe(model, item, cond, W, turn_tokens):
    """(exact match, entries at the answer, refocus ms, ingest s) for one item under one condition."""
    s = session_for(model, cond, W)
    a0 = item.answers[0].span[0]
    history, answer = item.ids[:a0], item.ids[a0:]
    t0 = time.perf_counter()
    for start in range(0, len(history), turn_tokens):
        s.ingest(history[start:start + turn_tokens])
        last = start + turn_tokens >= len(history)
        s.refocus(block_scores=needle_scores(item, s.num_tokens, s.bs) if last and cond == "ORACLE" else None)
    ingest_s = time.perf_counter() - t0
    entries = s.num_entries
    got = list(s.generate(len(answer), temperature=0.0))
    return got == answer, entries, s.stats()["mean_refocus_ms"], ingest_s


def bootstrap_ci(hits, n_boot=1000, seed=0):
    x = np.asarray(hits, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main(argv=None):
    args = build_parser().parse_args(argv)
    conditions = [c for c in args.conditions.split(",") if c]
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not 0.0 <= args.needle_at < 1.0:
        die(f"--conditions takes {', '.join(CONDITIONS)} (got {', '.join(bad)})" if bad else
            f"--needle_at={args.needle_at} must lie in [0, 1)")
    try:
        histories = [int(h) for h in args.histories.split(",")]
    except ValueError:
        die(f"--histories must be comma-separated token counts, got {args.histories!r}")
    device = args.device_type or autodetect_device_type()
    try:
        model, tokenizer, _ = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step)
    except (RuntimeError, ValueError, OSError) as e:
        die(str(e))
    if getattr(model, "mc_modules", None) is None:
        die("mc_recall needs a MegaContext checkpoint (GistNet weights, meta['mc_config']): train one with "
            "`bash run10.sh --gpu cpu --profile mc --recall` or `--mc_enabled=1`")
    if model.mc_modules.lensnet is None and "lensnet" in conditions:
        conditions.remove("lensnet")
        print("this checkpoint has no LensNet: the lensnet condition is skipped", flush=True)
    W = args.mc_infer_wc_length or (3 * model.config.sequence_len) // 4
    bs = model.mc_config.block_size
    results = {"settings": vars(args), "histories": {}}
    for H in histories:
        items = [probe_item(tokenizer, i, H, bs * 4, bs, "passkey", straddle=False, seed=args.seed,
                            at=args.needle_at) for i in range(args.probes)]
        block = {"distance_mean": float(np.mean([it.info["distance"] for it in items])), "conditions": {}}
        for cond in conditions:
            try:
                rows = [run_probe(model, it, cond, W, args.turn_tokens) for it in items]
            except MCSessionError as e:
                die(str(e))
            hits = [r[0] for r in rows]
            block["conditions"][cond] = {
                "exact_match": float(np.mean(hits)), "ci95": bootstrap_ci(hits), "n": len(hits),
                "entries_at_answer": float(np.mean([r[1] for r in rows])),
                "refocus_ms": float(np.mean([r[2] for r in rows])), "ingest_s": float(np.mean([r[3] for r in rows]))}
            c = block["conditions"][cond]
            print(f"H={H:>8,} needle ~{block['distance_mean']:,.0f} tokens back | {cond:8s} exact match "
                  f"{c['exact_match']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}] | {c['entries_at_answer']:.0f} "
                  f"entries | refocus {c['refocus_ms']:.1f} ms | ingest {c['ingest_s']:.1f} s", flush=True)
        results["histories"][str(H)] = block
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
