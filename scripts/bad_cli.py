"""
Bad command lines must end in one clear error, never a traceback. This runs a fixed list of bad invocations
of the project's scripts, each as a subprocess with a timeout, in a temporary $NANOCHAT_BASE_DIR (your real
one is never touched), and checks that each one

  - exits non-zero (a timeout counts as a failure: it means the bad value was not caught),
  - prints no "Traceback (most recent call last)",
  - prints an error message containing the case's expected text (the flag, the file, ...).

    python -m scripts.bad_cli                 # every case (~90; about 3 minutes on 2 cores)
    python -m scripts.bad_cli --kind parse    # only the values argparse must refuse (no checkpoint needed)
    python -m scripts.bad_cli --list          # print the cases
    python -m scripts.bad_cli --jobs 4        # run 4 at a time

Cases of kind "run" need a base dir with a tokenizer and tiny checkpoints: the script builds one (a few
seconds): base/sft checkpoints "tiny", a copy with n_head=0 in meta.json ("badhead"), one with a flipped
byte in model.pt ("flipped", caught by the sha256 in meta.json), one without meta.json ("nometa"), one
with an unreadable meta.json ("garbage"). Exit code 0 = every case clean, 1 = some case printed a
traceback or no error. tests/test_cli_checks.py runs the parse cases in-process plus a few as subprocesses.
"""

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from nanochat import cli_checks as ck
from nanochat.checkpoint_manager import save_checkpoint, step_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.synthetic import synthetic_texts
from nanochat.tokenizer import RustBPETokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACEBACK = "Traceback (most recent call last)"


@dataclasses.dataclass(frozen=True)
class Case:
    module: str  # scripts.<module>
    args: tuple
    expect: str  # text the error output must contain
    kind: str = "parse"  # parse: argparse refuses it; run: caught after parsing (may need the fixture)

    def command(self) -> list[str]:
        return [sys.executable, "-m", f"scripts.{self.module}", *self.args]

    def __str__(self):
        return f"{self.module} {' '.join(self.args)}"


def _p(module, *args, expect):
    return Case(module, tuple(args), expect, "parse")


def _r(module, *args, expect):
    return Case(module, tuple(args), expect, "run")


CASES = [
    # base_train: sizes, rates, tags
    _p("base_train", "--depth=0", expect="--depth"),
    _p("base_train", "--depth=-3", expect="--depth"),
    _p("base_train", "--depth=two", expect="--depth"),
    _p("base_train", "--device_batch_size=0", expect="--device_batch_size"),
    _p("base_train", "--max_seq_len=0", expect="--max_seq_len"),
    _p("base_train", "--head_dim=0", expect="--head_dim"),
    _p("base_train", "--aspect_ratio=0", expect="--aspect_ratio"),
    _p("base_train", "--kv_head_ratio=0", expect="--kv_head_ratio"),
    _p("base_train", "--total_batch_size=0", expect="--total_batch_size"),
    _p("base_train", "--num_iterations=0", expect="--num_iterations"),
    _p("base_train", "--matrix_lr=nan", expect="--matrix_lr"),
    _p("base_train", "--embedding_lr=-1", expect="--embedding_lr"),
    _p("base_train", "--grad_clip=inf", expect="--grad_clip"),
    _p("base_train", "--target_flops=nan", expect="--target_flops"),
    _p("base_train", "--prev_token_mix=-1", expect="--prev_token_mix"),
    _p("base_train", "--model_tag=../escape", expect="--model_tag"),
    _p("base_train", "--model_tag=/tmp/abs", expect="--model_tag"),
    _p("base_train", "--init_from=../../x", expect="--init_from"),
    _p("base_train", "--keep_last=0", expect="--keep_last"),
    _p("base_train", "--eval_every=12Q", expect="--eval_every"),
    _p("base_train", "--compile=maybe", expect="--compile"),
    _p("base_train", "--source=nope", expect="--source"),
    _p("base_train", "--mc_train_wc_length=lots", expect="--mc_train_wc_length"),
    _p("base_train", "--dept=4", expect="unrecognized"),
    # mid_train / chat_sft (one parser) / chat_rl
    _p("mid_train", "--device_batch_size=0", expect="--device_batch_size"),
    _p("mid_train", "--num_epochs=0", expect="--num_epochs"),
    _p("mid_train", "--source_tag=../x", expect="--source_tag"),
    _p("mid_train", "--max_seq_len=0", expect="--max_seq_len"),
    _p("chat_sft", "--model_tag=a/b", expect="--model_tag"),
    _p("chat_sft", "--init_lr_frac=nan", expect="--init_lr_frac"),
    _p("chat_sft", "--recall_examples=-5", expect="--recall_examples"),
    _p("chat_rl", "--temperature=nan", expect="--temperature"),
    _p("chat_rl", "--top_k=-1", expect="--top_k"),
    _p("chat_rl", "--num_samples=0", expect="--num_samples"),
    _p("chat_rl", "--device_batch_size=0", expect="--device_batch_size"),
    _p("chat_rl", "--model_tag=..", expect="--model_tag"),
    # chat_cli / chat_web / chat_eval
    _p("chat_cli", "-t", "nan", expect="--temperature"),
    _p("chat_cli", "-t", "-0.5", expect="--temperature"),
    _p("chat_cli", "-k", "-3", expect="--top_k"),
    _p("chat_cli", "-m", "0", expect="--max_tokens"),
    _p("chat_cli", "-g", "../../etc", expect="--model_tag"),
    _p("chat_cli", "-s", "-1", expect="--step"),
    _p("chat_cli", "-i", "pretrain", expect="--source"),
    _p("chat_cli", "--mc_infer_wc_length=0", "--mc", expect="--mc_infer_wc_length"),
    _p("chat_web", "--port", "99999", expect="--port"),
    _p("chat_web", "--port", "0", expect="--port"),
    _p("chat_web", "--port", "http", expect="--port"),
    _p("chat_web", "--temperature", "inf", expect="--temperature"),
    _p("chat_web", "--num_gpus", "0", expect="--num_gpus"),
    _p("chat_web", "-g", "../x", expect="--model_tag"),
    _p("chat_web", "--max_queue", "-1", expect="--max_queue"),
    _p("chat_web", "--request_timeout", "nan", expect="--request_timeout"),
    _p("web_fuzz", "--requests", "0", expect="--requests"),
    _p("web_fuzz", "--timeout", "-1", expect="--timeout"),
    _p("chat_eval", "-i", "sft", "-t", "nan", expect="--temperature"),
    _p("chat_eval", "-i", "sft", "-n", "0", expect="--num-samples"),
    _p("chat_eval", "-i", "sft", "-b", "0", expect="--batch-size"),
    _p("chat_eval", "-i", "sft", "-g", "../x", expect="--model-tag"),
    _p("chat_eval", "-g", "tiny", expect="--source"),  # -i is required
    # evals and benches
    _p("base_loss", "--device_batch_size=0", expect="--device_batch_size"),
    _p("base_loss", "--model_tag=../x", expect="--model_tag"),
    _p("base_eval", "--max_per_task=0", expect="--max_per_task"),
    _p("base_eval", "--step=-2", expect="--step"),
    _p("mc_eval", "--batch_size=0", expect="--batch_size"),
    _p("mc_eval", "--num_probes=-1", expect="--num_probes"),
    _p("mc_eval", "--model_tag=..", expect="--model_tag"),
    _p("mc_bench", "--depth=0", expect="--depth"),
    _p("mc_bench", "--vocab_size=0", expect="--vocab_size"),
    _p("mc_bench_train", "--device_batch_size=0", expect="--device_batch_size"),
    _p("mc_bench_train", "--anneal_progress=nan", expect="--anneal_progress"),
    _p("recall_bench", "--depth=0", expect="--depth"),
    _p("tok_train", "--vocab_size=0", expect="--vocab_size"),
    _p("tok_eval", "--doc_chars=0", expect="--doc_chars"),
    # caught after parsing: checks that need two flags, a checkpoint or the file system
    _r("chat_cli", "--mc_stats", expect="--mc"),
    _r("chat_web", "--temperature", "5", expect="--temperature"),
    _r("chat_web", "--temperature", "1e-45", expect="--temperature"),
    _r("chat_web", "--allowed_hosts", "a b,c", expect="--allowed_hosts"),
    _r("chat_web", "--mc_infer_wc_length", "8", expect="--mc"),
    _r("chat_web", "--num_gpus", "2", "--device_type", "cpu", expect="--num_gpus"),
    _r("chat_cli", "-g", "nosuchtag", "-p", "hi", "--device_type", "cpu", expect="nosuchtag"),
    _r("chat_cli", "-g", "tiny", "-s", "99", "-p", "hi", "--device_type", "cpu", expect="step 99"),
    _r("chat_cli", "-g", "badhead", "-p", "hi", "--device_type", "cpu", expect="meta.json"),
    _r("chat_cli", "-g", "flipped", "-p", "hi", "--device_type", "cpu", expect="sha256"),
    _r("chat_cli", "-g", "nometa", "-p", "hi", "--device_type", "cpu", expect="meta.json"),
    _r("chat_cli", "-g", "garbage", "-p", "hi", "--device_type", "cpu", expect="meta.json"),
    _r("chat_cli", "-g", "tiny", "--mc", "-p", "hi", "--device_type", "cpu", expect="--mc"),
    _r("chat_web", "-g", "badhead", "--device_type", "cpu", expect="meta.json"),
    _r("chat_web", "-g", "flipped", "--device_type", "cpu", expect="sha256"),
    _r("chat_eval", "-i", "sft", "-g", "badhead", "--device_type", "cpu", expect="meta.json"),
    _r("base_loss", "--model_tag=nosuchtag", "--device_type=cpu", expect="nosuchtag"),
    _r("mc_eval", "--source=sft", "--model_tag=flipped", "--device_type=cpu", expect="sha256"),
    _r("mc_eval", "--model_tag=tiny", "--mc_eval_wc_length=32", "--probe_multipliers=x", "--device_type=cpu",
       expect="--probe_multipliers"),
    _r("mc_bench", "--histories=abc", "--device_type=cpu", expect="--histories"),
    _r("base_train", "--resume=soon", "--device_type=cpu", expect="--resume"),
    _r("base_train", "--total_batch_size=1000", "--device_type=cpu", expect="--total_batch_size"),
    _r("base_train", "--init_from=nosuchtag", "--depth=2", "--max_seq_len=32", "--device_batch_size=2",
       "--total_batch_size=64", "--device_type=cpu", expect="nosuchtag"),
    _r("base_train", "--mc_block_size=8", "--device_type=cpu", expect="--mc_enabled"),
    _r("base_train", "--source=dir", "--data_dir=/nonexistent/nanochat", "--device_type=cpu", expect="nonexistent"),
    _r("mid_train", "--source_tag=nosuchtag", "--device_type=cpu", expect="nosuchtag"),
    _r("chat_rl", "--source_tag=nosuchtag", "--device_type=cpu", expect="nosuchtag"),
]


# --------------------------------------------------------------------------------------------------
# The fixture: a tokenizer and tiny checkpoints, some of them broken on purpose.
def build_fixture(base: str):
    tok = RustBPETokenizer.train_from_iterator(itertools.islice(synthetic_texts(), 20), 300, pad_vocab=True)
    tok.save(os.path.join(base, "tokenizer"))
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    meta = {"model_config": dataclasses.asdict(cfg), "step": 5}
    for source, tag in [("base", "tiny"), ("chatsft", "tiny"), ("chatsft", "badhead"), ("chatsft", "flipped"),
                        ("chatsft", "nometa"), ("chatsft", "garbage")]:
        save_checkpoint(os.path.join(base, f"{source}_checkpoints", tag), 5, model.state_dict(), None, meta)
    sft = os.path.join(base, "chatsft_checkpoints")
    path = os.path.join(step_dir(os.path.join(sft, "badhead"), 5), "meta.json")
    with open(path) as f:
        bad = json.load(f)
    bad["model_config"]["n_head"] = 0
    with open(path, "w") as f:
        json.dump(bad, f)
    with open(os.path.join(step_dir(os.path.join(sft, "flipped"), 5), "model.pt"), "r+b") as f:
        f.seek(-100, os.SEEK_END)  # inside the last tensor's bytes, well before the zip directory
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.remove(os.path.join(step_dir(os.path.join(sft, "nometa"), 5), "meta.json"))
    with open(os.path.join(step_dir(os.path.join(sft, "garbage"), 5), "meta.json"), "w") as f:
        f.write("{not json")
    # the "tiny" sft tag must be the newest so that runs without -g pick a good checkpoint
    os.utime(os.path.join(sft, "tiny"))


# --------------------------------------------------------------------------------------------------
def run_case(case: Case, base: str, timeout: float) -> tuple[str, str]:
    """(verdict, detail): verdict is ok | traceback | exit0 | timeout | no_message."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MC_OTEL_ENDPOINT", None)
    try:
        r = subprocess.run(case.command(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "timeout", f"still running after {timeout:g}s: the bad value was not refused"
    out = r.stdout + r.stderr
    if TRACEBACK in out:
        return "traceback", out[out.index(TRACEBACK):][-1500:]
    if r.returncode == 0:
        return "exit0", out[-500:]
    if case.expect.lower() not in r.stderr.lower() and case.expect.lower() not in r.stdout.lower():
        return "no_message", f"exit {r.returncode}, expected {case.expect!r} in:\n{out[-800:]}"
    last = [line for line in r.stderr.splitlines() if line.strip()]
    return "ok", last[-1] if last else out.strip().splitlines()[-1]


def build_parser():
    p = argparse.ArgumentParser(description="Run bad command lines; none may print a traceback.", allow_abbrev=False)
    p.add_argument("--kind", default="all", choices=["all", "parse", "run"], help="which cases (default: all)")
    p.add_argument("--jobs", type=ck.positive_int, default=2, help="cases run at a time")
    p.add_argument("--timeout", type=ck.positive_float, default=120.0, help="seconds per case before it counts as a failure")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--verbose", action="store_true", help="print every case's error line, not only failures")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cases = [c for c in CASES if args.kind in ("all", c.kind)]
    if args.list:
        for c in cases:
            print(f"[{c.kind}] {c}")
        return 0
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bad_cli_") as base:
        if any(c.kind == "run" for c in cases):
            build_fixture(base)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda c: run_case(c, base, args.timeout), cases))
    failures = 0
    for case, (verdict, detail) in zip(cases, results):
        if verdict != "ok":
            failures += 1
            print(f"FAIL [{verdict}] {case}\n    " + detail.replace("\n", "\n    "))
        elif args.verbose:
            print(f"ok   {case}\n    {detail}")
    tracebacks = sum(v == "traceback" for v, _ in results)
    print(f"bad_cli: {len(cases)} bad command lines, {len(cases) - failures} ended in one clear error, "
          f"{tracebacks} traceback(s), {failures - tracebacks} other failure(s) ({time.time() - t0:.0f}s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
