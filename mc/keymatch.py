"""
Keymatch: which blocks of the history does the current question ask about? Read from the GPT's own
layer-0 attention (its c_k / c_q, trained by the LM loss), with no parameters of its own. mc_eval's
MC-KEYMATCH condition (mc/eval/keymatch_condition.py) and the inference session's keymatch focus
(--mc_infer_focus=keymatch, mc/infer/session.py) both score blocks with it.

    x = layer0_inputs(model, embeddings)        # block 0's attention input, from embeddings alone
    keys, query = layer0_keys(model, x), layer0_query(model, x[:, t])
    z = block_scores(keys, query, bs)           # [R, n_blocks]: how far each block stands out

Keys: the GPT's layer-0 attention keys of the history tokens,
    h_t = norm(norm(e_t) + lambda W [norm(e_{t-1}); ...; norm(e_{t-k})])  block 0's attention input,
    k_t = norm(c_k(h_t))  per kv head                                     e_t = wte(x_t) (the tree's LOD0)
(the lambda W term only for a GPT with the previous-token mix, GPTConfig.prev_token_mix.) Why layer 0:
its input is built from the token embeddings alone (the token and, with the mix, the k before it), so a
block's keys need nothing but the block's own tokens (and the k before it), which the MegaContext tree
already holds, and they never change once computed (the session caches them, LayerZeroKeys). Any
deeper layer's keys need that layer's input, i.e. a pass of the GPT over the whole history: reading
everything, which is FULL, not a focus policy. No rotary: the rotation encodes the distance between
query and key; block selection should match content ("which block mentions what the question asks
about") wherever the block lies, as the long-range paths of NSA / HSA do.

Query: q_h = norm(c_q(h_t)) of one token t: the question's last token (where the GPT's own lookup
happens: its prediction IS the recall). Never the answer itself: keying on the answer's tokens would
find the source block through the answer, which no deployed refocus could do.

Block score, per head h (query head h reads kv head h // (n_head / n_kv_head), as the attention does):
    m_{b,h} = max over t in block b of  q_h . k_t          Quest's bound: the block's best key, not its mean
    z_{b,h} = (m_{b,h} - mean_b m_{.,h}) / std_b m_{.,h}   how far block b stands out for this head
    s_b     = max over h of z_{b,h}     (a block next to a match within CONTINUATION tokens of their shared
                                     edge inherits the match's z: the value after it, or the cue before it)
Why max over tokens: a needle is one or two tokens of a 32-token block; mean-pooling (MoBA) drowns it in
the other 30 (measured on the recall model, lab notebook "MC-KEYMATCH: the best key of a block": the
needle's block ranked first 0.06 with mean keys and a mean query vs 0.41 with this score; top-3 0.16 vs
0.72). Why a z-score across blocks, then max over heads: heads differ in scale (QK-norm, query gain)
and most heads are positional, so their best key scores alike everywhere; a retrieval head makes one
block stand out, and the z-score lets that head speak without knowing in advance which head it is (no
tuning on any data).
"""

import dataclasses

import torch
import torch.nn.functional as F

from mc.allocator import PlanDoesNotFitError
from mc.entry_allocator import SpanScores, allocate_entries, apply_edits, overlay_marks
from mc.mapped import GrowableRows
from nanochat.gpt import norm


def layer0_inputs(model, embeddings: torch.Tensor) -> torch.Tensor:
    """[R, T, C]: the input of block 0's attention from the token embeddings [R, T, C] alone, as
    GPT.forward builds it: the normed embedding, plus the previous-token mix when the GPT has one (zero
    before the first token), normed again by the block."""
    return norm(model.mix_previous(norm(embeddings)))


def layer0_keys(model, x: torch.Tensor) -> torch.Tensor:
    """[R, T, H_kv, D]: QK-normed layer-0 keys of the layer-0 inputs x [R, T, C], without rotary."""
    attn = model.transformer.h[0].attn
    return norm(attn.c_k(x).view(*x.shape[:-1], attn.n_kv_head, attn.head_dim))


def layer0_query(model, x: torch.Tensor) -> torch.Tensor:
    """[..., H, D]: QK-normed layer-0 queries of the layer-0 inputs x [..., C] (one token per row: [R, C]
    -> [R, H, D]; several: [R, Q, C] -> [R, Q, H, D]), without rotary (and without the query gain, which
    scales a head's scores uniformly: block_scores' z-score removes it)."""
    attn = model.transformer.h[0].attn
    return norm(attn.c_q(x).view(*x.shape[:-1], attn.n_head, attn.head_dim))


CONTINUATION = 8  # a match within 8 tokens of a block edge: the value after it / the cue before it may lie across
EDGE_TIE = 1e-3  # how far below the matched block its neighbour scores


def block_scores(keys: torch.Tensor, queries: torch.Tensor, block_size: int, leave_one_out: bool = False) -> torch.Tensor:
    """float [R, n_blocks]: max over heads of the z-scored best key of each whole block (module docstring),
    with the continuation rule. keys [R, T, H_kv, D] (T // bs whole blocks are scored); queries [R, H, D]
    (one query token per row) or [R, Q, H, D] (Q query tokens: the max runs over heads and queries)."""
    R, T, H_kv, D = keys.shape
    n = T // block_size
    if n == 0:
        return torch.zeros(R, 0, device=keys.device)
    if queries.ndim == 4:  # [R, Q, H, D] -> [R, H * Q, D], head-major, so index // (Q H / H_kv) is the kv head
        queries = queries.transpose(1, 2).reshape(R, -1, D)
    best, where = _best_keys(keys, queries, block_size)  # [R, n, H]: the best key and its offset in the block
    if leave_one_out and n > 2:  # each block against the OTHER blocks' mean and std (see tail_block_scores)
        d = best - best.mean(1, keepdim=True)  # centred first: the sums below then cancel nothing large
        mean = -d / (n - 1)  # the others' mean (the d sum to 0)
        var = (d.square().sum(1, keepdim=True) - d.square()) / (n - 1) - mean.square()
        z = (d - mean) / var.clamp(min=0).sqrt().clamp(min=1e-6)
    else:
        mean, std = best.mean(1, keepdim=True), best.std(1, keepdim=True, correction=0)
        z = (best - mean) / std.clamp(min=1e-6)
    # Block edges. The retrieval head matches the token where the value starts; the model then reads the
    # tokens that FOLLOW the match (the rest of the value), and the match itself was made with the cue the
    # previous-token mix carried from the tokens BEFORE it. A raw token after a gist gets the gist, not its
    # cue, as its "previous token". So a match in the last CONTINUATION tokens of block b makes block b + 1
    # score at least block b's z (measured: MC-KEYMATCH read 0.94 of the 16W needles inside one block but
    # 0.06 of those straddling two, lab notebook), and a match in the first CONTINUATION tokens makes
    # block b - 1 do so (a 50K-token session missed a value that began its block).
    # The neighbour scores a hair below the match (EDGE_TIE), so the matched block itself is opened first.
    ninf = torch.full_like(z[:, :1], float("-inf"))
    carried = z - EDGE_TIE
    forward = torch.cat([ninf, torch.where(where >= block_size - CONTINUATION, carried, float("-inf"))[:, :-1]], 1)
    backward = torch.cat([torch.where(where < CONTINUATION, carried, float("-inf"))[:, 1:], ninf], 1)
    return torch.maximum(z, torch.maximum(forward, backward)).amax(2)


SCORE_CHUNK = 4096  # keys scored per matmul: a float copy of this many keys stays in cache (7x faster at 256K)


def _best_keys(keys: torch.Tensor, queries: torch.Tensor, block_size: int):
    """(best, where) [R, n, H * Q]: each whole block's best q . k per query head and its offset in the block.
    keys [R, T, H_kv, D] (any float dtype); queries [R, H * Q, D], head-major. The keys are read in chunks of
    whole blocks: a session's history keys are bfloat16 (LayerZeroKeys), and one float copy of all of them
    (512 MB at 1M tokens) cost more than the products."""
    R, T, H_kv, D = keys.shape
    n = T // block_size
    # query head j reads kv head j // rep (as the attention does), without materialising repeated keys
    q = queries.float().view(R, H_kv, -1, D).transpose(-1, -2)  # [R, H_kv, D, rep]
    step = max(SCORE_CHUNK // block_size, 1) * block_size
    best, where = [], []
    for a in range(0, n * block_size, step):
        b = min(a + step, n * block_size)
        s = torch.matmul(keys[:, a:b].float().transpose(1, 2), q)  # [R, H_kv, b - a, rep]
        s = s.transpose(1, 2).reshape(R, (b - a) // block_size, block_size, -1)
        chunk_best, chunk_where = s.max(2)
        best.append(chunk_best)
        where.append(chunk_where)
    return torch.cat(best, 1), torch.cat(where, 1)


def expand_blocks_to_raw(plans: torch.Tensor, blocks: torch.Tensor, block_size: int, max_lod: int) -> torch.Tensor:
    """Copy of plans int8 [R, T] with block blocks[r] of row r made raw (blocks long [R]; -1 = leave the
    row alone): the legal expansion ORACLE uses (expand_to_raw), for one block per row, as one tensor op.

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


class LayerZeroKeys:
    """The layer-0 keys of a growing token history (one row), computed once per token: a token's key
    reads only its own embedding and the k = prev_token_mix before it, so appending never changes the
    keys already cached. Stored in bfloat16: H_kv * D * 2 bytes per token (256 B at width 128)."""

    def __init__(self, model, folder: str | None = None):
        """folder: keep the keys in a memory-mapped file there (--mc_tree disk, mc/mapped.py)."""
        self.model = model
        self.context = int(getattr(model.config, "prev_token_mix", 0) or 0)  # tokens before a key that it reads
        attn = model.transformer.h[0].attn
        self.shape = (attn.n_kv_head, attn.head_dim)
        self.rows = GrowableRows(torch.bfloat16, self.shape, folder, min_rows=1024)
        self.n = 0

    def _inputs(self, ids: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """[b - a, C]: layer-0 inputs of tokens a..b-1 of the history ids (1-D), reading k tokens before a."""
        lo = max(a - self.context, 0)
        emb = self.model.transformer.wte(ids[lo:b].to(self.model.transformer.wte.weight.device).long())
        return layer0_inputs(self.model, emb[None].float())[0, a - lo:]

    @torch.inference_mode()  # the session calls it in inference mode; its cache must stay one kind of tensor
    def extend(self, ids: torch.Tensor):
        """Cache the keys of ids[self.n:] (ids: the whole history so far, 1-D)."""
        a, b = self.n, ids.numel()
        if b <= a:
            return
        keys = layer0_keys(self.model, self._inputs(ids, a, b)[None])[0].to("cpu", torch.bfloat16)
        self.rows.reserve(b, a)[a:b] = keys
        self.n = b

    def view(self) -> torch.Tensor:
        return self.rows.data[: self.n]

    @torch.inference_mode()
    def query(self, ids: torch.Tensor, t: int) -> torch.Tensor:
        """[1, H, D]: the layer-0 query of history token t."""
        return layer0_query(self.model, self._inputs(ids, t, t + 1))

    @torch.inference_mode()
    def tail_scores(self, ids: torch.Tensor, limit: int, block_size: int) -> torch.Tensor:
        """[1, limit // bs]: LensNet's content match at inference (tail_block_scores, one query: the
        history's last token) for the whole blocks before token `limit`."""
        self.extend(ids)
        T = ids.numel()
        query = layer0_query(self.model, self._inputs(ids, T - 1, T))[None]  # [1, 1, H, D]
        keys = self.view()[None, :limit // block_size * block_size].to(query.device)
        return block_scores(keys, query, block_size, leave_one_out=True)

    def nbytes(self) -> int:
        """Bytes in RAM (0 when the keys live in a mapped file)."""
        return self.rows.nbytes()

    def mapped_bytes(self) -> int:
        return self.rows.mapped_bytes()

    def release(self):
        self.rows.release()


KEYMATCH_MIN_Z = 3.0  # a block is "asked about" when it stands >= 3 std above the others for some head


# ------------------------------------------------------------------ LensNet's content-match input
# With --lensnet_match=1 LensNet reads, per working-context entry, m_e = relu(z_e - KEYMATCH_MIN_Z): how far
# the best block inside the entry's span stands out beyond "asked about" for the queries. Training: the
# queries are the raw tail whose NLL the variants are compared on (each tail token is the query of the
# next target; max over queries as over heads). Inference: the question's last token, where the answer
# starts (one query picks the needle's block best: measured on the recall checkpoint, the needle beat
# every other block in 1.00 of the 16W probes with 1 query, 0.94 with 4, 0.91 with 16).
# z here is leave-one-out: each block against the OTHER blocks' mean and std. The plain z of block_scores
# is at most sqrt(n - 1) (an outlier inflates the std it is divided by), 3.3 with the 12 blocks of a
# 512-token history, so relu(z - 3) was ~0 for every block in training (measured: needle z 2.9 at 512
# tokens, 4.1 at 2,048); leave-one-out the needle stands at ~6.6 at 512 and ~5.0 at 2,048 tokens,
# the best other block at ~2.6 and ~3.0 (lab notebook, "LensNet reads the content match").
def tail_block_scores(model, embeddings: torch.Tensor, query_ends: torch.Tensor, n_queries: int, limit: int,
                      block_size: int) -> torch.Tensor:
    """float [R, limit // bs]: leave-one-out block_scores of the whole blocks before token `limit` for the
    queries = the tokens [max(end - n_queries, limit), end) of each row (query_ends long [R], all > limit:
    a query never scores its own block). embeddings [R, T, C]: the history's token embeddings (LOD0)."""
    x = layer0_inputs(model, embeddings.detach())
    first = (query_ends - n_queries).clamp(min=limit)
    idx = torch.minimum(first[:, None] + torch.arange(n_queries, device=x.device), query_ends[:, None] - 1)
    queries = layer0_query(model, x.gather(1, idx[..., None].expand(-1, -1, x.size(-1))))  # [R, Q, H, D]
    return block_scores(layer0_keys(model, x[:, :limit // block_size * block_size]), queries, block_size,
                        leave_one_out=True)


def match_strength(z: torch.Tensor) -> torch.Tensor:
    return (z - KEYMATCH_MIN_Z).clamp(min=0)


def entry_match(z: torch.Tensor, span_start: torch.Tensor, lod: torch.Tensor, valid: torch.Tensor,
                block_size: int, max_lod: int) -> torch.Tensor:
    """float [R, L]: m_e of every entry (span_start, lod, valid [R, L]) from block scores z [R, n_blocks]:
    the strongest block inside a gist's aligned span (a LOD-l gist spans bs**(l-1) blocks), a raw token's
    own block; 0 for entries past the scored blocks and for padding."""
    m = match_strength(z.float())
    out = torch.zeros(span_start.shape, dtype=m.dtype, device=m.device)
    if m.size(1) == 0:
        return out
    for level in range(max_lod + 1):
        k = block_size ** max(level - 1, 0)  # blocks per entry of this level
        pooled = F.max_pool1d(m[:, None], k, k, ceil_mode=True)[:, 0] if k > 1 else m
        idx = span_start // (k * block_size)
        hit = valid & (lod == level) & (idx < pooled.size(1))
        out = torch.where(hit, pooled.gather(1, idx.clamp(0, pooled.size(1) - 1)), out)
    return out


def token_match(z: torch.Tensor, T: int, block_size: int) -> torch.Tensor:
    """float [R, T]: m of every token's block (0 past the scored blocks)."""
    m = match_strength(z.float()).repeat_interleave(block_size, dim=1)[:, :T]
    return F.pad(m, (0, T - m.size(1)))


# ------------------------------------------------------------------ the inference session's keymatch focus
KEYMATCH_MAX_BLOCKS = 2  # blocks made raw per refocus (a fact and its neighbour when it straddles a boundary)


def keymatch_refocus(start: torch.Tensor, lod: torch.Tensor, z: torch.Tensor, W: int, cfg, limit: int):
    """One keymatch refocus of a session's entry list (start, lod long [L], covering the history) from block
    scores z [1, >= n_blocks]: (start', lod', marks, edits, stats) as mc.entry_allocator.allocate_entries
    returns them, stats["expands"] = blocks made raw; limit: the first token of the raw tail.

    The asked blocks are the (at most KEYMATCH_MAX_BLOCKS) best blocks before the raw tail with
    z >= KEYMATCH_MIN_Z; those not raw yet are chosen. First the allocator's hard fit brings the entries to W
    minus the most the chosen blocks can cost (max_lod (bs - 1) entries each), collapsing the OLDEST detail
    first (token scores rise linearly from -1 at the start of the history to 0 at its end, the asked
    blocks score +1, so a block opened by an earlier refocus for the same question stays open;
    thresholds out of reach, so no other edit); then the chosen blocks are opened to raw, whatever level the
    fit left them at (a chain of expands, the gist that holds the block down to the block). Room is made before
    the blocks open, so a fit can never close them again (opening first and fitting after did: with few
    collapse candidates the hard fit took the chosen block too, measured on a 50K-token session). A history
    that fits W is never compressed. If even the fully collapsed covering leaves no room for a chosen block,
    fewer blocks are opened; and a block the question asks about that is already raw is never collapsed to make
    room for the next-best one (measured at 1M tokens, where the coarsest covering leaves room for one raw
    block: each repeated refocus for the same question closed the needle's block, opened by the previous one,
    to open the runner-up).

    Cost: the entries and the asked blocks, not the history. The hard fit reads only the means of collapse
    groups, unions of whole entries, and the mean of a linear map over a union of segments is the
    length-weighted mean of its segments' own means: so each entry carries its mean (its midpoint's score), as
    one segment of a SpanScores (cut at the asked blocks' edges), and the fit is the one the per-token map makes."""
    bs, max_lod = cfg.block_size, cfg.max_lod
    T = int(start[-1] + bs ** lod[-1])
    z = z[:, :limit // bs].float().cpu()
    asked = [int(b) for b in z.argsort(1, descending=True)[0, :KEYMATCH_MAX_BLOCKS] if z[0, b] >= KEYMATCH_MIN_Z]

    def level(s, l, t):  # the level of token t in the entry list (s, l)
        return int(l[int(torch.searchsorted(s, torch.tensor(t), right=True)) - 1])

    chosen = [b for b in asked if level(start, lod, b * bs) > 0]  # the asked blocks not raw yet
    hard = dataclasses.replace(cfg, allocator_expand_threshold=2.0, allocator_collapse_threshold=-2.0)
    blocks = torch.tensor(asked, dtype=torch.long)
    cuts = torch.cat([start, blocks * bs, (blocks + 1) * bs]).unique()
    ends = torch.cat([cuts[1:], torch.tensor([T])])
    oldest_first = ((cuts + ends - 1).double() / 2) / max(T, 1) - 1.0  # the mean of t / T - 1 over each segment
    oldest_first[torch.isin(cuts // bs, blocks)] = 1.0  # the segments are cut at the asked blocks' edges
    spans = SpanScores(cuts, ends, oldest_first)
    for n in range(len(chosen), -1, -1):
        reserve = n * max_lod * (bs - 1)
        if W - reserve < 1:
            continue
        try:
            fit_start, fit_lod, marks, edits, stats = allocate_entries(start, lod, spans, W - reserve, hard, bs,
                                                                       max_lod, limit)
        except PlanDoesNotFitError:
            if n == 0:
                raise
            continue
        if n and any(level(fit_start, fit_lod, b * bs) != 0 for b in asked if b not in chosen):
            continue  # the room for n more blocks would close one the question already holds open: open fewer
        for b in chosen[:n]:
            while (lv := level(fit_start, fit_lod, b * bs)) > 0:
                span = bs ** lv
                edit = (1, 1.0, b * bs // span * span, span, lv - 1)
                fit_start, fit_lod = apply_edits(fit_start, fit_lod, [edit], bs)
                edits.append(edit)
        opened = torch.tensor([[b * bs, (b + 1) * bs, 1] for b in chosen[:n]], dtype=torch.long).view(-1, 3)
        stats["expands"] = torch.tensor([n])
        return fit_start, fit_lod, overlay_marks(marks, opened), edits, stats  # just expanded: hysteresis
