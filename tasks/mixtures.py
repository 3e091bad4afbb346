"""
The midtraining and SFT mixtures (scripts/mid_train.py, scripts/chat_sft.py): their flags and
make_task(args, split) -> TaskMixture.

- offline (default): SyntheticRecallChat + SpellingBee + Identity (+ --custom_json), no network
- full: adds the hub tasks (mid: SmolTalk, MMLU auxiliary train, GSM8K; SFT: SmolTalk, ARC, GSM8K),
  from the hub or from local snapshots (--data_dir, tasks.common.hub_kw)
"""

from nanochat import cli_checks as ck
from tasks import arc, gsm8k, mmlu, smoltalk
from tasks.common import TaskMixture, hub_kw
from tasks.customjson import CustomJSON
from tasks.identity import Identity
from tasks.spellingbee import SpellingBee
from tasks.synthetic_chat import SyntheticRecallChat


def _add_mixture_flags(p, full_adds, recall, spelling, identity, val):
    """The flags both mixtures share; the defaults (example counts) are the stage's."""
    a = p.add_argument
    a("--mixture", default="offline", choices=["offline", "full"],
      help=f"offline: SyntheticRecallChat + SpellingBee + Identity; full adds {full_adds} (HF hub)")
    a("--custom_json", default="", help="a .jsonl of conversations (CustomJSON format) to mix in")
    a("--data_dir", default="", help="local hub snapshots for --mixture full (<dir>/<hub id>/...; default: the hub)")
    a("--recall_examples", type=ck.nonneg_int, default=recall, help="SyntheticRecallChat train conversations")
    a("--recall_context_chars", type=ck.positive_int, default=2000,
      help="characters of context per recall conversation")
    a("--spelling_examples", type=ck.nonneg_int, default=spelling, help="SpellingBee train conversations")
    a("--identity_repeats", type=ck.nonneg_int, default=identity,
      help="times the Identity conversations appear per epoch")
    a("--val_examples", type=ck.nonneg_int, default=val, help="conversations per offline validation task")


def _offline_tasks(args, split, seed):
    """The offline part of both mixtures: synthetic recall + spelling (+ Identity, custom JSON for train)."""
    if split != "train":
        return [SyntheticRecallChat("val", args.val_examples, args.recall_context_chars, seed=seed),
                SpellingBee("val", args.val_examples, seed=seed)]
    tasks = [SyntheticRecallChat("train", args.recall_examples, args.recall_context_chars, seed=seed),
             SpellingBee("train", args.spelling_examples, seed=seed)]
    tasks += [Identity() for _ in range(args.identity_repeats)]
    if args.custom_json:
        tasks.append(CustomJSON(args.custom_json))
    return tasks


def add_mid_mixture_flags(p):
    _add_mixture_flags(p, "SmolTalk, MMLU aux train, GSM8K", recall=20000, spelling=20000, identity=4, val=500)


def make_mid_task(args, split):
    """TaskMixture of the midtraining tasks for split 'train' or 'val' (see --mixture)."""
    tasks = _offline_tasks(args, split, seed=0)
    if args.mixture == "full":
        if split == "train":
            tasks += [smoltalk.SmolTalk("train", **hub_kw(args.data_dir, smoltalk.HUB_PATH)),
                      mmlu.MMLU("auxiliary_train", "train", **hub_kw(args.data_dir, mmlu.HUB_PATH)),
                      gsm8k.GSM8K("main", "train", **hub_kw(args.data_dir, gsm8k.HUB_PATH))]
        else:
            tasks += [smoltalk.SmolTalk("test", **hub_kw(args.data_dir, smoltalk.HUB_PATH)),
                      mmlu.MMLU("all", "test", stop=5200, **hub_kw(args.data_dir, mmlu.HUB_PATH)),
                      gsm8k.GSM8K("main", "test", stop=420, **hub_kw(args.data_dir, gsm8k.HUB_PATH))]
    return TaskMixture(tasks, seed=args.seed)


def add_sft_mixture_flags(p):
    _add_mixture_flags(p, "SmolTalk, ARC, GSM8K", recall=2000, spelling=600, identity=1, val=200)
    p.add_argument("--smoltalk_examples", type=ck.nonneg_int, default=10000,
                   help="SmolTalk train conversations (--mixture full)")


def make_sft_task(args, split):
    """TaskMixture of the SFT tasks for split 'train' or 'val' (see --mixture)."""
    tasks = _offline_tasks(args, split, seed=1)
    if args.mixture == "full":
        if split == "train":
            tasks += [smoltalk.SmolTalk("train", stop=args.smoltalk_examples, **hub_kw(args.data_dir, smoltalk.HUB_PATH)),
                      arc.ARC("ARC-Easy", "train", **hub_kw(args.data_dir, arc.HUB_PATH)),
                      arc.ARC("ARC-Challenge", "train", **hub_kw(args.data_dir, arc.HUB_PATH)),
                      gsm8k.GSM8K("main", "train", **hub_kw(args.data_dir, gsm8k.HUB_PATH))]
        else:
            tasks.append(smoltalk.SmolTalk("test", stop=2000, **hub_kw(args.data_dir, smoltalk.HUB_PATH)))
    return TaskMixture(tasks, seed=args.seed)
