"""
Which model options let a small GPT learn exact recall on CPU? Trains one small GPT per configuration
on the same tokens and reports FULL attention's exact match on mc_eval's probes at several lengths.

    python -m scripts.recall_bench --configs=all,no_mix,no_partial_rope --tokens=6M --out=recall_bench.json

Defaults are the recall recipe's (run10.sh --recall): k = 4, T = 512, 4,096 tokens per step, 0.3x rates.

Each configuration is the recipe minus one part ("all" = every part on), so a row's drop against "all"
is that part's contribution on this budget. The parts (nanochat/gpt.py, nanochat/synthetic.py):
    mix            --prev_token_mix=k (k = --mix): x[t] += λ·W·[x[t-1]..x[t-k]] (key -> value lookup in one layer)
    query_gain     --query_gain=4: a learned per-head gain on the QK-normed queries
    partial_rope   --rope_fraction=0.5: the slowest half of the rotary pairs unrotated
    dense          --source=recall (dense recalls, loss mostly on the answers, documents sized to T)
                   instead of the story corpus
    curriculum     sequence length 256 -> 512 -> 1024 (-> --max_seq_len) instead of max_seq_len throughout
Scores (held-out: the probes are built from val documents with cues absent from them, mc/eval/data.py):
    passkey / kv   one needle in a haystack of L tokens, asked at the end (probe_items)
    assoc          8 key=value pairs >= W tokens before 4 queries (assoc_items; one score per query)
    corpus         in-distribution: dense val documents cut to L tokens, every recall answer inside them
                   whose fact lies >= 64 tokens earlier in the window (per-recall exact match)
exact match = argmax right at every answer token (the value and its closing ".").
Needs a tokenizer in $NANOCHAT_BASE_DIR (python -m scripts.tok_train --vocab_size=2048).
"""

import argparse
import json
import time

import numpy as np
import torch

from mc.eval.conditions import char_byte_offsets, char_span_to_tokens, token_byte_starts
from mc.eval.data import probe_items
from mc.eval.tasks import assoc_items
from nanochat import cli_checks as ck
from nanochat.common import parse_token_count
from nanochat.dataloader import DistributedTokenLoader
from nanochat.dataset import resolve_source, sized_for
from nanochat.gpt import GPT, GPTConfig
from nanochat.synthetic import synthetic_document
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import lr_multiplier, muon_momentum

PARTS = ("mix", "query_gain", "partial_rope", "dense", "curriculum")
CURRICULUM = (256, 512, 1024)  # then --max_seq_len; the stages split the tokens equally


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--configs", default="all," + ",".join(f"no_{x}" for x in PARTS),
                   help="comma list: all, no_<part> (parts: " + ", ".join(PARTS) + ")")
    p.add_argument("--tokens", type=parse_token_count, default=parse_token_count("6M"), help="training tokens per config")
    p.add_argument("--mix", type=ck.positive_int, default=4, help="k of --prev_token_mix when the mix is on")
    p.add_argument("--rope_fraction", type=ck.finite_float, default=0.5, help="when partial_rope is on")
    p.add_argument("--query_gain", type=ck.nonneg_float, default=4.0, help="when query_gain is on")
    p.add_argument("--corpus_docs", type=ck.nonneg_int, default=16, help="dense val documents per length for 'corpus'")
    p.add_argument("--depth", type=ck.positive_int, default=2)
    p.add_argument("--width", type=ck.positive_int, default=128)
    p.add_argument("--head_dim", type=ck.positive_int, default=32)
    p.add_argument("--max_seq_len", type=ck.positive_int, default=512)
    p.add_argument("--batch_tokens", type=ck.positive_int, default=4096, help="tokens per optimizer step")
    p.add_argument("--matrix_lr", type=ck.nonneg_float, default=0.006)  # the recall recipe's 0.3x rates
    p.add_argument("--embedding_lr", type=ck.nonneg_float, default=0.015)
    p.add_argument("--unembedding_lr", type=ck.nonneg_float, default=0.0012)
    p.add_argument("--wc_length", type=ck.positive_int, default=128, help="W: probes at multiples of it")
    p.add_argument("--lengths", default="4,16", help="history lengths as multiples of W")
    p.add_argument("--num_probes", type=ck.nonneg_int, default=64, help="probes per length (half passkey, half kv)")
    p.add_argument("--num_assoc", type=ck.nonneg_int, default=16, help="assoc sequences per length (4 queries each)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p.parse_args(argv)


def stages(config: str, max_T: int, tokens: int):
    """[(T, tokens)] of the length schedule."""
    if config == "no_curriculum":
        return [(max_T, tokens)]
    lengths = [t for t in CURRICULUM if t < max_T] + [max_T]
    return [(t, tokens // len(lengths)) for t in lengths]


def build_model(args, config: str, vocab_size: int):
    torch.manual_seed(args.seed)
    cfg = GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth,
                    n_head=args.width // args.head_dim, n_kv_head=args.width // args.head_dim, n_embd=args.width,
                    prev_token_mix=0 if config == "no_mix" else args.mix,
                    query_gain=0.0 if config == "no_query_gain" else args.query_gain,
                    rope_fraction=1.0 if config == "no_partial_rope" else args.rope_fraction)
    model = GPT(cfg)
    model.init_weights()
    return model


def train(args, config: str, model, tokenizer):
    source = resolve_source("synthetic" if config == "no_dense" else "recall")
    adamw, muon = model.setup_optimizers(embedding_lr=args.embedding_lr, matrix_lr=args.matrix_lr,
                                         unembedding_lr=args.unembedding_lr)
    total_steps = sum(max(1, n // args.batch_tokens) for _, n in stages(config, args.max_seq_len, args.tokens))
    step, losses = 0, []
    for T, n in stages(config, args.max_seq_len, args.tokens):
        B = max(1, args.batch_tokens // T)
        loader = DistributedTokenLoader(tokenizer, B, T, "train", sized_for(source, T))
        for _ in range(max(1, n // args.batch_tokens)):
            x, y = loader.next_batch()
            loss = model(x, y)
            loss.backward()
            lrm = lr_multiplier(step / total_steps, 0.0, 0.2, 0.0)
            for opt in (adamw, muon):
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * lrm
            for g in muon.param_groups:
                g["momentum"] = muon_momentum(step)
            adamw.step(), muon.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
    return float(np.mean(losses[-20:]))


@torch.no_grad()
def exact_match(model, items):
    """Fraction of items whose every answer token is the argmax (one forward per item)."""
    hits = []
    for it in items:
        ids = torch.tensor([it.ids[:-1]])
        pred = model(ids)[0].argmax(-1)
        for ans in it.answers:
            u0, u1 = ans.span
            hits.append(bool((pred[u0 - 1:u1 - 1] == torch.tensor(it.ids[u0:u1])).all()))
    return float(np.mean(hits))


@torch.no_grad()
def corpus_exact_match(model, tokenizer, piece_bytes, n_docs: int, L: int, min_distance: int = 64):
    """Per-recall exact match on dense val documents cut to L tokens (recalls whose fact is in the window)."""
    hits = []
    for i in range(n_docs):
        doc = synthetic_document(i, "val", density="dense", target_chars=L * 6)
        ids = [tokenizer.get_bos_token_id()] + tokenizer.encode(doc.text)[:L]
        cb, starts = char_byte_offsets(doc.text), token_byte_starts(np.asarray(piece_bytes)[np.asarray(ids)])
        pred = model(torch.tensor([ids[:-1]]))[0].argmax(-1)
        for r in doc.recalls:
            u0, u1 = char_span_to_tokens(r.answer_start, r.answer_end, cb, starts)
            f0, _ = char_span_to_tokens(r.fact_start, r.fact_start + 1, cb, starts)
            if u1 < len(ids) and u0 - f0 >= min_distance:
                hits.append(bool((pred[u0 - 1:u1 - 1] == torch.tensor(ids[u0:u1])).all()))
    return float(np.mean(hits)) if hits else float("nan")


def evaluate(args, model, tokenizer, piece_bytes):
    W, out = args.wc_length, {}
    for m in (int(x) for x in args.lengths.split(",")):
        L = m * W
        probes = probe_items(tokenizer, args.num_probes, L, W, 32, seed=1)
        out[f"passkey@{m}W"] = exact_match(model, [p for p in probes if p.info["fact"] == "passkey"])
        out[f"kv@{m}W"] = exact_match(model, [p for p in probes if p.info["fact"] == "kv"])
        out[f"assoc@{m}W"] = exact_match(model, assoc_items(tokenizer, piece_bytes, args.num_assoc, L, W, 32, seed=1))
        out[f"corpus@{m}W"] = corpus_exact_match(model, tokenizer, piece_bytes, args.corpus_docs, L)
    return out


def main(argv=None):
    args = parse_args(argv)
    tokenizer = get_tokenizer()
    piece_bytes = get_token_bytes().tolist()
    rows = []
    for config in args.configs.split(","):
        if config != "all" and config.removeprefix("no_") not in PARTS:
            raise SystemExit(f"--configs: unknown config {config!r}; use all or no_<part>, parts {PARTS}")
        t0 = time.time()
        model = build_model(args, config, tokenizer.get_vocab_size())
        final_loss = train(args, config, model, tokenizer)
        row = {"config": config, "train_loss": round(final_loss, 4), "train_s": round(time.time() - t0, 1)}
        model.eval()
        row.update(evaluate(args, model, tokenizer, piece_bytes))
        if model.config.prev_token_mix:
            row["prev_mix_lambda"] = round(model.prev_mix_lambda.item(), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
