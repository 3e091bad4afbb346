"""
Pieces shared by the chat training scripts (scripts/mid_train.py, chat_sft.py, chat_rl.py).

- micro_batch_loss():   a micro-batch's share of a step loss normalised by the step's supervised tokens
- MegaContext carry-through: a checkpoint loaded with MC modules (model.mc_modules / model.mc_config,
  attached by mc.infer.checkpoint.build_model, not GPT submodules) keeps them: mc_optimizer_params()
  puts them into the GPT's two optimizers, trainable_params() lists GPT + MC parameters (for gradient
  averaging and clipping), model_state_for_save() / mc_meta() write them back in the checkpoint
  convention ("mc."-prefixed weights + meta["mc_config"]), so the next stage loads them again.
The MC training step is mc.train.train_step.MCTrainStep (the same one pretraining runs); the midtraining
and SFT mixtures live in tasks/mixtures.py. Nothing here imports mc or tasks: the MC modules are
reached through the model's attributes and the checkpoint's "mc." prefix only.
"""

import dataclasses

from nanochat.checkpoint_manager import EXTRA_PREFIX


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
    """GPT weights + MC weights under `mc.` (EXTRA_PREFIX: the layout checkpoint_manager hands back and
    mc.infer.checkpoint attaches)."""
    mc_modules, _ = mc_parts(model)
    state = dict(model.state_dict())
    if mc_modules is not None:
        state.update({f"{EXTRA_PREFIX}{k}": v for k, v in mc_modules.state_dict().items()})
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
