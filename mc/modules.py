"""
MCModules: the trainable MegaContext networks that sit beside the GPT, as one nn.Module.

- MCModules.from_config(mc_config, n_embd)   builds them from an MCConfig for a GPT of width n_embd
- .gistnet                                   GistNet (mc/gistnet.py): block of embeddings -> one gist
- .lensnet                                   LensNet (mc/lensnet.py): scores WC entries for the focus
                                             allocator; None with --lensnet_type=none (fixed focus)
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

GistNet heads: the GPT's own head size is not known here (only the width), so GistNet aims at heads of
128 channels (n_embd // 128 heads) and steps down to the largest head count that splits the width into
equal, even-sized heads (448 -> 2 heads of 224; 64 -> 1 head). This keeps GistNet's attention shape
close to the GPT's at the usual head_dim=128.
"""

import dataclasses

import torch.nn as nn

from mc.config import FLAG_OF, MCConfig
from mc.gistnet import GistNet
from mc.lensnet import LensNet

PREFIX = "mc."


def gistnet_heads(n_embd: int) -> int:
    """Heads for a GistNet of this width: at most n_embd // 128, the largest count giving equal even heads."""
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
        lensnet = None
        if mc_config.lensnet_type == "transformer":
            lensnet = LensNet(n_embd, layers=mc_config.lensnet_layers, head=mc_config.lensnet_head,
                              max_lod=mc_config.max_lod, match=mc_config.lensnet_match)
        return cls(gistnet, lensnet)

    def init_weights(self):
        self.gistnet.init_weights()
        if self.lensnet is not None:
            self.lensnet.init_weights()

    def matrix_params(self) -> list:
        """2D weight matrices, for Muon."""
        out = list(self.gistnet.matrix_params()) if self.gistnet.gistnet_type != "mean" else []
        if self.lensnet is not None:
            out += self.lensnet.matrix_params()
        return out

    def adam_params(self) -> list:
        """Every other parameter, for AdamW."""
        out = list(self.gistnet.vector_params()) if self.gistnet.gistnet_type != "mean" else []
        if self.lensnet is not None:
            out += self.lensnet.vector_params()
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
    """MCConfig from meta["mc_config"] (dataclasses.asdict of the training config). Unknown fields (a
    checkpoint from a newer code version) raise ValueError naming them; missing ones (a checkpoint from
    before a knob existed) take today's defaults."""
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
