"""
MCModules: the trainable MegaContext networks that sit beside the GPT, as one nn.Module.

- MCModules.from_config(mc_config, n_embd)   builds them from an MCConfig for a GPT of width n_embd
- .gistnet                                   GistNet (mc/gistnet.py): block of embeddings -> one gist
- .lensnet                                   None until LensNet lands (mc/lensnet.py)
- .matrix_params() / .adam_params()          how they join the GPT's optimizers: 2D weight matrices
                                             go to Muon, everything else (vectors, the pooling query)
                                             to AdamW (GPT.setup_optimizers(extra_matrix_params=...,
                                             extra_adam_params=...))
- mc_state_dict(modules) / split_mc_state(state)   the checkpoint convention: MC weights live in the
                                             model's state dict under the prefix "mc." ("mc.gistnet.*")
- attach(model, modules, config)             sets model.mc_modules / model.mc_config (see below)

They are deliberately NOT a submodule of the GPT: GPT.state_dict() and GPT.parameters() stay exactly
those of a vanilla model, so vanilla code (optimizer setup, eval, export) never trips over them.
attach() stores them as plain attributes for the stages that need them (mid/SFT, chat --mc, mc_eval).

GistNet heads: the GPT's own head size is not known here (only the width), so GistNet uses heads of
128 channels where the width allows (n_embd // 128 heads), else one head over the whole width. This
keeps GistNet's attention shape close to the GPT's at the usual head_dim=128.
"""

import dataclasses

import torch.nn as nn

from mc.config import MCConfig
from mc.gistnet import GistNet

PREFIX = "mc."


def gistnet_heads(n_embd: int) -> int:
    """Heads for a GistNet of this width: n_embd // 128 when that gives an even head size, else 1."""
    n = max(1, n_embd // 128)
    while n > 1 and (n_embd % n or (n_embd // n) % 2):
        n -= 1
    if (n_embd // n) % 2:
        raise ValueError(f"GistNet needs an even head size; width n_embd={n_embd} is odd")
    return n


class MCModules(nn.Module):
    def __init__(self, gistnet: GistNet, lensnet: nn.Module | None = None):
        super().__init__()
        self.gistnet = gistnet
        self.lensnet = lensnet

    @classmethod
    def from_config(cls, mc_config: MCConfig, n_embd: int) -> "MCModules":
        gistnet = GistNet(n_embd, block_size=mc_config.block_size, gistnet_type=mc_config.gistnet_type,
                          layers=mc_config.gistnet_layers, pooling=mc_config.gistnet_pooling,
                          head=mc_config.gistnet_head, n_head=gistnet_heads(n_embd))
        return cls(gistnet)

    def init_weights(self):
        self.gistnet.init_weights()

    def matrix_params(self) -> list:
        """2D weight matrices, for Muon."""
        out = list(self.gistnet.matrix_params()) if self.gistnet.gistnet_type != "mean" else []
        if self.lensnet is not None:
            out += [p for p in self.lensnet.parameters() if p.ndim == 2]
        return out

    def adam_params(self) -> list:
        """Every other parameter, for AdamW."""
        out = list(self.gistnet.vector_params()) if self.gistnet.gistnet_type != "mean" else []
        if self.lensnet is not None:
            out += [p for p in self.lensnet.parameters() if p.ndim != 2]
        return out


def mc_state_dict(modules: MCModules) -> dict:
    """{'mc.gistnet.blocks.0...': tensor, ...}: ready to merge into the GPT's state dict."""
    return {PREFIX + k: v for k, v in modules.state_dict().items()}


def split_mc_state(state: dict) -> tuple[dict, dict]:
    """(gpt_state, mc_state without the prefix) from a checkpoint's model state."""
    gpt = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    mc = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return gpt, mc


def config_from_meta(mc_meta: dict) -> MCConfig:
    """MCConfig from meta["mc_config"] (dataclasses.asdict of the training config). Unknown or
    missing fields raise ValueError naming them (a checkpoint from another code version)."""
    names = {f.name for f in dataclasses.fields(MCConfig)}
    unknown = sorted(set(mc_meta) - names)
    if unknown:
        raise ValueError(f"mc_config has fields this code does not know: {unknown}")
    return MCConfig(**mc_meta)


def attach(model: nn.Module, modules: MCModules | None, config: MCConfig | None) -> nn.Module:
    """model.mc_modules = modules, model.mc_config = config, WITHOUT registering the modules as a
    submodule of the GPT (see the module docstring). Both None for a vanilla model."""
    object.__setattr__(model, "mc_modules", modules)
    object.__setattr__(model, "mc_config", config)
    return model


def resume_mismatch(saved: dict | None, cfg: MCConfig | None) -> str | None:
    """Why a checkpoint with meta["mc_config"] = saved cannot be resumed with cfg (None = it can): MC
    switched on or off, or any MC knob changed (named by its command-line flag)."""
    from mc.config import FLAG_OF

    if saved is None and cfg is None:
        return None
    if saved is None:
        return "it was trained without MegaContext; --mc_enabled=1 changes the experiment"
    if cfg is None:
        return "it was trained with MegaContext; pass --mc_enabled=1 and the same --mc_* flags"
    now = dataclasses.asdict(cfg)
    changed = [k for k in now if saved.get(k) != now[k]]
    if not changed:
        return None
    return "it was trained with " + ", ".join(f"{FLAG_OF[k]}={saved.get(k)!r} (now {now[k]!r})" for k in changed)
