"""
Why does a checkpoint miss passkeys? Two quick looks at mc_eval's probes (FULL attention, no MC):

  python dev/recall_diag.py --model_tag d2_recall [--step N] [--seed 1]

1. At 4W (the history fits the GPT): greedy answer tokens under teacher forcing. Exact match, first-token
   accuracy, and per probe the truth vs the prediction: a wrong first token with a right tail means
   induction works (after "89" the model copies what followed "89") and the key -> value lookup fails.
2. At 16W: where the needle's block ranks among the blocks before the cut under mc/keymatch.py's score
   (top-1 / top-3 / median rank), and per layer-0 head alone (which head retrieves).

--seed picks the probe set (mc_eval reports seed 0; choose settings on another seed).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mc.eval.data import probe_items  # noqa: E402
from mc.keymatch import block_scores, layer0_inputs, layer0_keys, layer0_query  # noqa: E402
from nanochat.checkpoint_manager import load_model  # noqa: E402


def first_token_report(model, tok, items):
    em = first = 0
    for it in items:
        a0, a1 = it.answers[0].span
        with torch.no_grad():
            logits = model(torch.tensor([it.ids[:-1]]))
        pred, true = logits[0, a0 - 1:a1 - 1].argmax(-1).tolist(), it.ids[a0:a1]
        em += pred == true
        first += pred[0] == true[0]
        print(f"  {it.info['fact']:7s} {'ok ' if pred == true else 'MISS'} {tok.decode(true)!r:>10} -> "
              f"{tok.decode(pred)!r:<10} needle {it.info['distance']} tokens back")
    n = len(items)
    print(f"exact match {em / n:.2f}, first answer token right {first / n:.2f} ({n} probes)")


def block_rank_report(model, items, W, bs):
    ranks = {"keymatch score": []}
    for it in items:
        T = len(it.ids) - 1
        cut = T - W
        with torch.no_grad():
            x = layer0_inputs(model, model.transformer.wte(torch.tensor([it.ids[:-1]])))
            keys, q = layer0_keys(model, x[:, :cut]), layer0_query(model, x[:, it.answers[0].span[0] - 1])
            z = block_scores(keys, q, bs)[0]
            rep = q.size(1) // keys.size(2)  # GQA: query head h reads kv head h // rep
            per_head = [block_scores(keys[:, :, h // rep, None], q[:, h, None], bs)[0] for h in range(q.size(1))]
        b = it.info["value_token"] // bs
        ranks["keymatch score"].append(int((z > z[b]).sum()))
        for h, zh in enumerate(per_head):
            ranks.setdefault(f"layer-0 head {h} alone", []).append(int((zh > zh[b]).sum()))
    for name, r in ranks.items():
        r = torch.tensor(r).float()
        print(f"  {name:22s} top-1 {(r == 0).float().mean():.2f}  top-3 {(r < 3).float().mean():.2f}  "
              f"median rank {int(r.median())} of {cut // bs}")


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model_tag", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="probe set (mc_eval reports seed 0)")
    p.add_argument("--num_probes", type=int, default=32)
    p.add_argument("--wc_length", type=int, default=128, help="W")
    p.add_argument("--block_size", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok, _ = load_model("base", "cpu", "eval", model_tag=args.model_tag, step=args.step)
    W, bs = args.wc_length, args.block_size
    print(f"FULL at 4W = {4 * W} tokens:")
    first_token_report(model, tok, probe_items(tok, args.num_probes, 4 * W, W, bs, seed=args.seed))
    print(f"needle block rank at 16W = {16 * W} tokens (keymatch, layer 0):")
    block_rank_report(model, probe_items(tok, args.num_probes, 16 * W, W, bs, seed=args.seed), W, bs)


if __name__ == "__main__":
    main()
