"""
Chat SFT: supervised fine-tuning of the midtrained model on whole conversations, loss on assistant
tokens only. The training loop is midtraining's (scripts/mid_train.py, run_stage); what differs is
the starting point (--source mid by default, or base), the mixture, and the defaults: one
conversation per row (--pack 0, padded to the longest row of the micro-batch), 32 rows per step,
learning rates × 0.02 with a linear decay to 0 over the run, output in chatsft_checkpoints/<tag>,
curve report/chat_sft_curve.jsonl, report section "Chat SFT".

    python -m scripts.chat_sft                                   # from the latest mid checkpoint, offline mixture
    python -m scripts.chat_sft --source base --mixture full      # straight from base; + SmolTalk, ARC, GSM8K
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft

Mixture (one epoch by default):
  offline: SyntheticRecallChat (train, a different document seed than midtraining) + SpellingBee + Identity
           (+ --custom_json)
  full:    + SmolTalk (first 10k), ARC-Easy + ARC-Challenge train, GSM8K train (HF hub)
Validation: SyntheticRecallChat val + SpellingBee val (+ SmolTalk test with --mixture full).
"""

from nanochat.chat_train import hub_kw
from scripts.mid_train import run_stage


def add_mixture_flags(p):
    a = p.add_argument
    a("--mixture", default="offline", choices=["offline", "full"],
      help="offline: SyntheticRecallChat + SpellingBee + Identity; full adds SmolTalk, ARC, GSM8K (HF hub)")
    a("--custom_json", default="", help="a .jsonl of conversations (CustomJSON format) to mix in")
    a("--data_dir", default="", help="local hub snapshots for --mixture full (<dir>/<hub id>/...; default: the hub)")
    a("--recall_examples", type=int, default=2000, help="SyntheticRecallChat train conversations")
    a("--recall_context_chars", type=int, default=2000, help="characters of context per recall conversation")
    a("--spelling_examples", type=int, default=600, help="SpellingBee train conversations")
    a("--identity_repeats", type=int, default=1, help="times the Identity conversations appear per epoch")
    a("--smoltalk_examples", type=int, default=10000, help="SmolTalk train conversations (--mixture full)")
    a("--val_examples", type=int, default=200, help="conversations per offline validation task")


def make_sft_task(args, split):
    """TaskMixture of the SFT tasks for split 'train' or 'val' (see --mixture)."""
    from tasks.common import TaskMixture
    from tasks.identity import Identity
    from tasks.spellingbee import SpellingBee
    from tasks.synthetic_chat import SyntheticRecallChat

    if split == "train":
        tasks = [SyntheticRecallChat("train", args.recall_examples, args.recall_context_chars, seed=1),
                 SpellingBee("train", args.spelling_examples, seed=1)]
        tasks += [Identity() for _ in range(args.identity_repeats)]
        if args.custom_json:
            from tasks.customjson import CustomJSON
            tasks.append(CustomJSON(args.custom_json))
        if args.mixture == "full":
            from tasks import arc, gsm8k, smoltalk
            tasks += [smoltalk.SmolTalk("train", stop=args.smoltalk_examples, **hub_kw(args.data_dir, smoltalk.HUB_PATH)),
                      arc.ARC("ARC-Easy", "train", **hub_kw(args.data_dir, arc.HUB_PATH)),
                      arc.ARC("ARC-Challenge", "train", **hub_kw(args.data_dir, arc.HUB_PATH)),
                      gsm8k.GSM8K("main", "train", **hub_kw(args.data_dir, gsm8k.HUB_PATH))]
    else:
        tasks = [SyntheticRecallChat("val", args.val_examples, args.recall_context_chars, seed=1),
                 SpellingBee("val", args.val_examples, seed=1)]
        if args.mixture == "full":
            from tasks import smoltalk
            tasks.append(smoltalk.SmolTalk("test", stop=2000, **hub_kw(args.data_dir, smoltalk.HUB_PATH)))
    return TaskMixture(tasks, seed=args.seed)


def main(argv=None):
    run_stage("sft", make_sft_task, argv, add_mixture_flags)


if __name__ == "__main__":
    main()
