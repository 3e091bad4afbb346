"""
MC-KEYMATCH: mc_eval's parameter-free focus condition at the focus budget (covering + E entries), the
Quest / MoBA-style baseline a learned scorer (LensNet) has to beat at the same number of entries
(DESIGN, "What the field shows about choosing which blocks to expand").

    q_pos = query_positions(query_ends)                        # the question's last token
    keys, queries = layer0_keys_queries(model, lod0, cut, q_pos) # the only place a model is read
    scores = block_scores(keys, queries, bs)                     # mc/keymatch.py
    plans = keymatch_plans(covering, scores, covering + E, cut, bs, max_lod)

Block scores: mc/keymatch.py (the GPT's layer-0 keys and the question's last token as the query; each
block's best key, z-scored across blocks per head, max over heads), computed from the tree's LOD0.

Expansion: greedy in score order under the budget. Each step, every row takes its best-scoring block
before the cut that is not raw yet and whose expansion still fits, and makes it raw with the same
legal expansion ORACLE uses (expand_to_raw: a LOD-l gist opens into its bs children, down to raw). A
block whose covering unit is still a LOD-l gist costs l (bs - 1) entries (open the unit, then the
block). Steps end when no row has a block that fits, so entries <= covering + E always; a row may end
below the cap when only expensive blocks are left. Tensors over rows and blocks; the only Python loop
is over steps (at most E / (bs - 1)).
"""

import torch

from mc.eval.conditions import check_cut, covering_plan, plan_entries
from mc.keymatch import block_scores, expand_blocks_to_raw, layer0_inputs, layer0_keys, layer0_query
from mc.working_context import entry_counts


def query_end(answer_spans, T: int, W: int) -> int:
    """History index where an item's question ends: u0 of the earliest answer span [u0, u1) whose first
    target lies in the raw window (history token u0 - 1 >= T - W), else T (no answer to protect)."""
    cut = max(T - W, 0)
    ends = [u0 for u0, _ in answer_spans if u0 - 1 >= cut]
    return min(ends) if ends else T


def query_positions(query_ends: torch.Tensor) -> torch.Tensor:
    """long [R]: the history position of each row's query token, the last one before its query end."""
    return (query_ends - 1).clamp(min=0)


def keymatch_plans(base: torch.Tensor, scores: torch.Tensor, budget: int, limit: int, block_size: int = 32,
                   max_lod: int = 2) -> torch.Tensor:
    """int8 [R, T]: the plans base [R, T] with the best-scoring blocks before token `limit` (the cut,
    block-aligned) made raw, greedily in score order, while each row's entries stay <= budget (module
    docstring). scores: float [R, >= limit // bs], one per block."""
    plans = base.clone()
    R = plans.size(0)
    n_blocks = limit // block_size
    scores = scores[:, :n_blocks].float()
    starts = torch.arange(n_blocks, device=plans.device) * block_size
    left = budget - entry_counts(plans, block_size)  # [R] entries still to spend
    rows = torch.arange(R, device=plans.device)
    for _ in range(max(int(left.max()), 0) // (block_size - 1) if R and n_blocks else 0):
        cost = (block_size - 1) * plans[:, starts].long().clamp(min=0)  # l (bs - 1) to make a LOD-l block raw
        fits = (cost > 0) & (cost <= left[:, None])
        some = fits.any(1)
        if not some.any():
            break
        best = torch.where(fits, scores, float("-inf")).argmax(1)
        left = left - cost[rows, best] * some
        plans = expand_blocks_to_raw(plans, torch.where(some, best, -1), block_size, max_lod)
    return plans


def layer0_keys_queries(model, lod0: torch.Tensor, cut: int, query_pos: torch.Tensor):
    """(keys [R, cut, H_kv, D], queries [R, H, D]): the GPT's layer-0 keys of the history before the cut
    and the query at query_pos [R], from the token embeddings lod0 [R, T, C], with QK-norm and without
    rotary (module docstring)."""
    x = layer0_inputs(model, lod0)
    return layer0_keys(model, x[:, :cut]), layer0_query(model, x[torch.arange(x.size(0), device=x.device), query_pos])


def keymatch_focus(model, lod0: torch.Tensor, answer_spans: list, W: int, budget_extra: int, block_size: int = 32,
                   max_lod: int = 2) -> torch.Tensor:
    """MC-KEYMATCH plans int8 [R, T] for R items of one history length T = lod0.size(1): the covering plus
    at most budget_extra entries on the blocks that best match each item's question. answer_spans:
    per item, its answers' ids spans (where its question ends)."""
    R, T = lod0.shape[:2]
    cut = check_cut(T, W, block_size)
    base = covering_plan(T, W, block_size, max_lod).to(lod0.device)
    budget = plan_entries(base.cpu(), block_size) + budget_extra
    base = base.expand(R, T)
    if cut < block_size:  # nothing before the cut to expand
        return base.clone()
    ends = torch.tensor([query_end(spans, T, W) for spans in answer_spans], device=lod0.device)
    keys, queries = layer0_keys_queries(model, lod0, cut, query_positions(ends))
    scores = block_scores(keys, queries, block_size)
    return keymatch_plans(base, scores, budget, cut, block_size, max_lod)
