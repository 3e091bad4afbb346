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

Mixture (nanochat/chat_train.py; one epoch by default):
  offline: SyntheticRecallChat (train, a different document seed than midtraining) + SpellingBee + Identity
           (+ --custom_json)
  full:    + SmolTalk (first 10k), ARC-Easy + ARC-Challenge train, GSM8K train (HF hub)
Validation: SyntheticRecallChat val + SpellingBee val (+ SmolTalk test with --mixture full).
"""

from scripts.mid_train import run_stage
from tasks.mixtures import add_sft_mixture_flags as add_mixture_flags  # the SFT mixture
from tasks.mixtures import make_sft_task


def main(argv=None):
    run_stage("sft", make_sft_task, argv, add_mixture_flags)


if __name__ == "__main__":
    main()
