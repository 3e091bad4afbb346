"""
mc/focus.py: one refocus (LensNet scores of the current working context + one allocator call), and
first_changed_token (where a KV cache over the working context stops being valid).
"""

import pytest
import torch

from mc.config import MCConfig
from mc.eval.conditions import covering_plan
from mc.focus import first_changed_token, refocus
from mc.modules import MCModules
from mc.tree import MegaContextTree
from mc.working_context import build_working_context, check_invariants

C, BS = 32, 8


def setup(T=8 * 64, W=64, recent=16, seed=0):
    torch.manual_seed(seed)
    cfg = MCConfig(block_size=BS, max_lod=2, recent_tokens=recent, train_wc_length=W, gistnet_layers=1)
    mods = MCModules.from_config(cfg, C)
    with torch.no_grad():
        tree = MegaContextTree.build(torch.randn(1, T, C), mods.gistnet, BS, 2)
    plan = covering_plan(T, recent, BS, 2)[None]  # coarsest covering, last `recent` raw
    return cfg, mods, tree, plan


def test_fresh_lensnet_and_no_lensnet_make_no_edits_when_the_plan_fits():
    cfg, mods, tree, plan = setup()
    for lensnet in (mods.lensnet, None):  # a fresh LensNet scores 0 everywhere: no opinion, no edit
        new, state, info = refocus(lensnet, plan, tree.levels, cfg, W=64)
        assert torch.equal(new, plan) and not info["changed"].any() and int(info["expands"].sum()) == 0
        assert info["scores"].abs().max() == 0


def test_a_lensnet_favouring_one_block_expands_it_within_budget():
    cfg, mods, tree, plan = setup()
    T = plan.size(1)
    wc = build_working_context(plan, tree.levels, BS)
    target = int(wc.span_start[0, (wc.lod[0] == 1).nonzero()[0, 0]])  # the first LOD1 gist's block
    # a stand-in scorer: +1 on the entry covering `target`, -1 on everything else
    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, embeddings, lod, span_start, span_len, valid):
            hit = (span_start <= target) & (target < span_start + span_len)
            return torch.where(hit, 1.0, -1.0) * valid

    W = int(wc.valid.sum()) + BS - 1  # room for exactly one expansion
    new, state, info = refocus(Scorer(), plan, tree.levels, cfg, W=W)
    assert int(info["expands"][0]) == 1 and bool(info["changed"][0])
    assert (new[0, target: target + BS] == 0).all()  # that block is raw now
    new_wc = build_working_context(new, tree.levels, BS)
    check_invariants(new_wc, T, BS, max_len=W)
    assert int(new_wc.valid.sum()) <= W
    assert int(first_changed_token(plan, new)[0]) == target
    # hysteresis: the next refocus may not collapse what was just expanded
    again, _, info2 = refocus(Scorer(), new, tree.levels, cfg, W=W, state=state)
    assert (again[0, target: target + BS] == 0).all()


def test_history_that_outgrew_w_is_collapsed_to_fit():
    cfg, mods, tree, plan = setup()
    raw = torch.zeros_like(plan)  # everything raw: 512 entries
    new, _, info = refocus(None, raw, tree.levels, cfg, W=64)
    assert int(info["forced"][0]) > 0
    assert int(build_working_context(new, tree.levels, BS).valid.sum()) <= 64
    assert (new[0, -16:] == 0).all()  # the recent tail stays raw


def test_first_changed_token_and_bad_input():
    a = torch.zeros(2, 16, dtype=torch.int8)
    b = a.clone()
    b[1, 8:] = 1
    assert first_changed_token(a, b).tolist() == [16, 8]
    cfg, mods, tree, plan = setup()
    with pytest.raises(ValueError, match="plan must be"):
        refocus(None, plan[0], tree.levels, cfg, W=64)
