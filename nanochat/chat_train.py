"""
Pieces shared by the chat training scripts (scripts/mid_train.py, chat_sft.py, chat_rl.py).

- micro_batch_loss():   a micro-batch's share of a step loss normalised by the step's supervised tokens
- MegaContext carry-through: a checkpoint loaded with MC modules (model.mc_modules / model.mc_config,
  attached by checkpoint_manager.build_model, not GPT submodules) keeps them: mc_optimizer_params()
  puts them into the GPT's two optimizers, trainable_params() lists GPT + MC parameters (for gradient
  averaging and clipping), model_state_for_save() / mc_meta() write them back in the checkpoint
  convention ("mc."-prefixed weights + meta["mc_config"]), so the next stage loads them again.
- mc_forward():         MCController.process_batch with the trainer's error policy
- hub_kw():             data_dir= for a hub task when the user keeps local snapshots (--data_dir)
- the midtraining and SFT mixtures: add_mid_mixture_flags / make_mid_task, add_sft_mixture_flags / make_sft_task
"""

import dataclasses
import os

from nanochat import cli_checks as ck


def mc_parts(model):
    """(mc_modules, mc_config) of a loaded model; both None for a vanilla one (attribute may be absent)."""
    return getattr(model, "mc_modules", None), getattr(model, "mc_config", None)


def mc_optimizer_params(mc_modules):
    """MC parameters for the two optimizers: (2D weight matrices -> Muon, everything else -> AdamW)."""
    if mc_modules is None:
        return [], []
    if hasattr(mc_modules, "matrix_params"):
        return list(mc_modules.matrix_params()), list(mc_modules.adam_params())
    params = [p for p in mc_modules.parameters() if p.requires_grad]
    return [p for p in params if p.ndim == 2], [p for p in params if p.ndim != 2]


def trainable_params(model) -> list:
    """GPT parameters + MC parameters (MC modules are attached, not registered as GPT submodules)."""
    mc_modules, _ = mc_parts(model)
    return list(model.parameters()) + (list(mc_modules.parameters()) if mc_modules is not None else [])


def model_state_for_save(model):
    """GPT weights + MC weights under `mc.` (the layout checkpoint_manager.build_model reads back)."""
    mc_modules, _ = mc_parts(model)
    state = dict(model.state_dict())
    if mc_modules is not None:
        state.update({f"mc.{k}": v for k, v in mc_modules.state_dict().items()})
    return state


def mc_meta(model) -> dict:
    """{"mc_config": asdict(MCConfig)} for an MC model, {} for a vanilla one."""
    _, mc_config = mc_parts(model)
    return {} if mc_config is None else {"mc_config": dataclasses.asdict(mc_config)}


def micro_batch_loss(model, x, y, num_targets: int, world_size: int = 1):
    """(share, token_loss_sum): this micro-batch's share of the step loss, Σ token losses × world_size / N,
    where N = num_targets = supervised tokens (y != -1) of the whole step on all processes, and the plain
    Σ token losses (detached, for logging). Targets -1 contribute exactly 0, so an all-masked micro-batch
    gives share 0 with a zero (finite) gradient; N = 0 is guarded (max(N, 1)) but the trainer skips it."""
    token_loss_sum = model(x, y, loss_reduction="sum")
    return token_loss_sum * (world_size / max(num_targets, 1)), token_loss_sum.detach()


def hub_kw(data_root: str, hub_path: str) -> dict:
    """{"data_dir": <data_root>/<hub_path>} when data_root is set (a local snapshot laid out like the hub
    repository, e.g. <root>/allenai/ai2_arc/ARC-Easy/test-*.parquet), else {} (load from the hub)."""
    return {"data_dir": os.path.join(data_root, hub_path)} if data_root else {}


def mc_forward(controller, x, y, step, row_ids):
    """MCController.process_batch under autocast; a controller failure stops training with one clear error
    (never a silent fallback to the plain loss)."""
    from mc.controller import MCControllerError
    from nanochat.common import autocast_ctx, die
    try:
        with autocast_ctx(x.device.type):
            return controller.process_batch(x, y, step, row_ids=row_ids)
    except MCControllerError as e:
        die(f"{e}\ntraining stopped: the MegaContext step failed (no fallback to the vanilla loss)")


# --------------------------------------------------------------------------------------------------
# The two mixtures (scripts/mid_train.py, scripts/chat_sft.py): their flags and make_task(args, split).
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
    from tasks.identity import Identity
    from tasks.spellingbee import SpellingBee
    from tasks.synthetic_chat import SyntheticRecallChat

    if split != "train":
        return [SyntheticRecallChat("val", args.val_examples, args.recall_context_chars, seed=seed),
                SpellingBee("val", args.val_examples, seed=seed)]
    tasks = [SyntheticRecallChat("train", args.recall_examples, args.recall_context_chars, seed=seed),
             SpellingBee("train", args.spelling_examples, seed=seed)]
    tasks += [Identity() for _ in range(args.identity_repeats)]
    if args.custom_json:
        from tasks.customjson import CustomJSON
        tasks.append(CustomJSON(args.custom_json))
    return tasks


def add_mid_mixture_flags(p):
    _add_mixture_flags(p, "SmolTalk, MMLU aux train, GSM8K", recall=20000, spelling=20000, identity=4, val=500)


def make_mid_task(args, split):
    """TaskMixture of the midtraining tasks for split 'train' or 'val' (see --mixture)."""
    from tasks.common import TaskMixture

    tasks = _offline_tasks(args, split, seed=0)
    if args.mixture == "full":
        from tasks import gsm8k, mmlu, smoltalk
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
    from tasks.common import TaskMixture

    tasks = _offline_tasks(args, split, seed=1)
    if args.mixture == "full":
        from tasks import arc, gsm8k, smoltalk
        if split == "train":
            tasks += [smoltalk.SmolTalk("train", stop=args.smoltalk_examples, **hub_kw(args.data_dir, smoltalk.HUB_PATH)),
                      arc.ARC("ARC-Easy", "train", **hub_kw(args.data_dir, arc.HUB_PATH)),
                      arc.ARC("ARC-Challenge", "train", **hub_kw(args.data_dir, arc.HUB_PATH)),
                      gsm8k.GSM8K("main", "train", **hub_kw(args.data_dir, gsm8k.HUB_PATH))]
        else:
            tasks.append(smoltalk.SmolTalk("test", stop=2000, **hub_kw(args.data_dir, smoltalk.HUB_PATH)))
    return TaskMixture(tasks, seed=args.seed)
