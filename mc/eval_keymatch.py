"""
MC-KEYMATCH: mc_eval's parameter-free focus condition at the focus budget (covering + E entries), the
Quest / MoBA-style baseline a learned scorer (LensNet) has to beat at the same number of entries
(DESIGN, "What the field shows about choosing which blocks to expand").

    q_pos = query_positions(query_ends)                        # the question's last token
    keys, queries = layer0_keys_queries(model, lod0, cut, q_pos) # the only place a model is read
    scores = block_scores(keys, queries, bs)
    plans = keymatch_plans(covering, scores, covering + E, cut, bs, max_lod)

Keys: the GPT's layer-0 attention keys of every history token before the cut,
    h_t = norm(norm(e_t) + lambda W [norm(e_{t-1}); ...; norm(e_{t-k})])  block 0's attention input,
    k_t = norm(c_k(h_t))  per kv head                                     e_t = wte(x_t) (the tree's LOD0)
(the lambda W term only for a GPT with the previous-token mix, GPTConfig.prev_token_mix.) Why layer 0:
its input is built from the token embeddings alone (the token and, with the mix, the k before it), so a
block's keys need nothing but the block's own tokens (and the k before it), which the MegaContext tree
already holds. Any deeper layer's keys need that layer's input, i.e. a pass of the GPT over the whole
history - reading everything, which is FULL, not a focus policy. No rotary: the rotation encodes the
distance between query and key; block selection should match content ("which block mentions what the
question asks about") wherever the block lies, as the long-range paths of NSA / HSA do.

Query: q_h = norm(c_q(h_t)) for the one history token t right before the item's first answer token in
the raw window (the token whose prediction IS the recall, where the GPT's own lookup happens), else the
last history token (plain text, no answer). Never the answer itself: keying on the answer's tokens
would find the source block through the answer, which no deployed refocus could do.

Block score, per head h (query head h reads kv head h // (n_head / n_kv_head), as the attention does):
    m_{b,h} = max over t in block b of  q_h . k_t      Quest's bound: the block's best key, not its mean
    z_{b,h} = (m_{b,h} - mean_b m_{.,h}) / std_b m_{.,h}   how far block b stands out for this head
    s_b     = max over h of z_{b,h}
Why max over tokens: a needle is one or two tokens of a 32-token block; mean-pooling (MoBA) drowns it in
the other 30 (measured on the recall model, lab notebook "MC-KEYMATCH: the best key of a block": the needle's block ranked first
0.06 with mean keys and a mean query, vs 0.41 with this score; top-3 0.16 vs 0.72). Why a z-score
across blocks, then max over heads: heads differ in scale (QK-norm, query gain) and most heads are
positional, so their best key scores alike everywhere; a retrieval head makes one block stand out, and
the z-score lets that head speak without knowing in advance which head it is (no tuning on any data).

Expansion: greedy in score order under the budget. Each step, every row takes its best-scoring block
before the cut that is not raw yet and whose expansion still fits, and makes it raw with the same
legal expansion ORACLE uses (expand_to_raw: a LOD-l gist opens into its bs children, down to raw). A
block whose covering unit is still a LOD-l gist costs l (bs - 1) entries (open the unit, then the
block). Steps end when no row has a block that fits, so entries <= covering + E always; a row may end
below the cap when only expensive blocks are left. Tensors over rows and blocks; the only Python loop
is over steps (at most E / (bs - 1)).
"""

import torch

from mc.eval_conditions import check_cut, covering_plan, plan_entries
from mc.working_context import entry_counts
from nanochat.gpt import norm

def query_end(answer_spans, T: int, W: int) -> int:
    """History index where an item's question ends: u0 of the earliest answer span [u0, u1) whose first
    target lies in the raw window (history token u0 - 1 >= T - W), else T (no answer to protect)."""
    cut = max(T - W, 0)
    ends = [u0 for u0, _ in answer_spans if u0 - 1 >= cut]
    return min(ends) if ends else T


def query_positions(query_ends: torch.Tensor) -> torch.Tensor:
    """long [R]: the history position of each row's query token, the last one before its query end."""
    return (query_ends - 1).clamp(min=0)


def block_scores(keys: torch.Tensor, queries: torch.Tensor, block_size: int) -> torch.Tensor:
    """float [R, n_blocks]: max over heads of the z-scored best key of each whole block (module docstring).
    keys [R, T, H_kv, D] (T // bs whole blocks are scored), queries [R, H, D]."""
    R, T, H_kv, D = keys.shape
    n = T // block_size
    rep = queries.size(1) // H_kv
    k = keys[:, : n * block_size].repeat_interleave(rep, dim=2)  # [R, n*bs, H, D]
    s = torch.einsum("rthd,rhd->rth", k.float(), queries.float())
    best = s.view(R, n, block_size, -1).amax(2)  # [R, n, H]
    mean, std = best.mean(1, keepdim=True), best.std(1, keepdim=True, correction=0)
    return ((best - mean) / std.clamp(min=1e-6)).amax(2)


def expand_blocks_to_raw(plans: torch.Tensor, blocks: torch.Tensor, block_size: int, max_lod: int) -> torch.Tensor:
    """Copy of plans int8 [R, T] with block blocks[r] of row r made raw (blocks long [R]; -1 = leave the
    row alone): expand_to_raw for one block per row, as one tensor op.

    Expanding the LOD-l gist that holds the block down to raw gives every token t of that LOD-l unit the
    level m(t) - 1, where m(t) is the finest level whose aligned unit holds both t and the block (m = 1:
    t is in the block -> raw; m = 2: same LOD2 unit, other block -> LOD1 gist). Tokens outside the unit
    (m > l) keep their level."""
    R, T = plans.shape
    t = torch.arange(T, device=plans.device)
    start = (blocks.clamp(min=0) * block_size)[:, None]  # [R, 1] the block's first token
    shared = sum(((t // block_size ** k) == (start // block_size ** k)).long() for k in range(1, max_lod + 1))
    m = max_lod + 1 - shared  # units nest, so t shares the levels m..max_lod with the block
    level = plans.gather(1, start).long()  # [R, 1] the block's current level
    hit = (m <= level) & (blocks >= 0)[:, None]
    return torch.where(hit, (m - 1).to(plans.dtype), plans)


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


def layer0_inputs(model, lod0: torch.Tensor) -> torch.Tensor:
    """[R, T, C]: the input of block 0's attention from the token embeddings lod0 [R, T, C] alone, as
    GPT.forward builds it: the normed embedding, plus the previous-token mix when the GPT has one (zero
    before the first token), normed again by the block."""
    return norm(model.mix_previous(norm(lod0)))


def layer0_keys_queries(model, lod0: torch.Tensor, cut: int, query_pos: torch.Tensor):
    """(keys [R, cut, H_kv, D], queries [R, H, D]): the GPT's layer-0 keys of the history before the cut
    and the query at query_pos [R], from the token embeddings lod0 [R, T, C], with QK-norm and without
    rotary (module docstring)."""
    attn = model.transformer.h[0].attn
    x = layer0_inputs(model, lod0)
    R = x.size(0)
    k = attn.c_k(x[:, :cut]).view(R, cut, attn.n_kv_head, attn.head_dim)
    xq = x[torch.arange(R, device=x.device), query_pos]
    q = attn.c_q(xq).view(R, attn.n_head, attn.head_dim)
    return norm(k), norm(q)


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
