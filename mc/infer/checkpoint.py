"""
Loading a MegaContext checkpoint: nanochat.checkpoint_manager rebuilds the GPT (the ground floor never
imports mc), this module builds GistNet and LensNet from meta["mc_config"] and the "mc."-prefixed state
the loader handed back (meta["extra_state"]), and attaches them (mc.modules.attach).

    model, tokenizer, meta = load_model("base", device, "eval", model_tag="d12_mc")   # any stage, as nanochat's
    model.mc_modules, model.mc_config        # MCModules and MCConfig; both None for a vanilla checkpoint

Same arguments, same return and the same CheckpointError as nanochat.checkpoint_manager.load_model /
build_model, which the vanilla-only stages (base_eval, base_loss, chat_eval) keep using.
"""

import torch

from mc.modules import MCModules, attach, config_from_meta, split_mc_state
from nanochat import checkpoint_manager as ckpt
from nanochat.checkpoint_manager import CheckpointError


def attach_saved_modules(model, meta: dict, where: str, phase: str):
    """Build, load and attach the MC modules a checkpoint's meta describes (module docstring); a vanilla
    checkpoint gets mc_modules = mc_config = None. Errors name the checkpoint and the fix."""
    _, mc_state = split_mc_state(meta.get("extra_state") or {})
    mc_config = mc_modules = None
    if meta.get("mc_config") is not None:
        try:
            mc_config = config_from_meta(meta["mc_config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"meta.json mc_config of {where} does not fit mc.config.MCConfig ({e}); "
                                  f"it was written by another version of the MegaContext code")
    elif mc_state:
        raise CheckpointError(f"{where} holds MegaContext weights (mc.*) but its meta.json has no mc_config; "
                              f"the checkpoint is incomplete: re-save it from the trainer")
    if mc_config is not None:
        with torch.device(model.get_device()):
            mc_modules = MCModules.from_config(mc_config, model.config.n_embd)
        try:
            mc_modules.load_state_dict(mc_state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"MegaContext weights in {where} do not fit the modules built from "
                                  f"meta.json mc_config: {e}")
        mc_modules.train(phase == "train")
    return attach(model, mc_modules, mc_config)


def build_model(checkpoint_dir, step, device, phase="eval"):
    """nanochat.checkpoint_manager.build_model plus the MC modules (module docstring)."""
    model, tokenizer, meta = ckpt.build_model(checkpoint_dir, step, device, phase)
    attach_saved_modules(model, meta, checkpoint_dir, phase)
    return model, tokenizer, meta


def load_model(source, device, phase, model_tag=None, step=None):
    """nanochat.checkpoint_manager.load_model plus the MC modules (module docstring)."""
    model, tokenizer, meta = ckpt.load_model(source, device, phase, model_tag=model_tag, step=step)
    attach_saved_modules(model, meta, f"the {source} checkpoint {model_tag or '(latest tag)'}", phase)
    return model, tokenizer, meta
