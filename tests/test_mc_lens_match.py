"""LensNet's content match (--lensnet_match=1): the keymatch block scores of the recent tokens, read per
working-context entry (mc/keymatch.py), a learned gain in LensNet (mc/lensnet.py), and a refocus that
opens the matching block of a far LOD2 gist, not an arbitrary child (mc/focus.py)."""

import pytest
import torch

from mc.config import MCConfig
from mc.focus import refocus
from mc.gistnet import GistNet
from mc.infer.session import MCSession
from mc.keymatch import (
    KEYMATCH_MIN_Z,
    block_scores,
    entry_match,
    layer0_inputs,
    layer0_keys,
    layer0_query,
    tail_block_scores,
    token_match,
)
from mc.lensnet import LensNet
from mc.modules import MCModules
from mc.train.controller import MCController
from mc.tree import MegaContextTree
from nanochat.gpt import GPT, GPTConfig

BS = 32


def _gpt(seq_len=512, mix=2):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=256, n_layer=1, n_head=4, n_kv_head=2, n_embd=64,
                          prev_token_mix=mix, rope_fraction=0.5))
    model.init_weights()
    return model.eval()


def test_several_queries_score_like_the_best_single_query():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 8 * BS, 2, 16, generator=g)
    queries = torch.randn(2, 5, 4, 16, generator=g)  # [R, Q, H, D], 4 query heads read 2 kv heads
    each = torch.stack([block_scores(keys, queries[:, q], BS) for q in range(5)])
    torch.testing.assert_close(block_scores(keys, queries, BS), each.amax(0))


def test_entry_match_reads_the_strongest_block_of_each_span():
    z = torch.zeros(1, 64)
    z[0, 37] = KEYMATCH_MIN_Z + 5.0  # inside the second LOD2 unit [1024, 2048)
    z[0, 3] = KEYMATCH_MIN_Z - 1.0  # below "asked about": no strength
    span_start = torch.tensor([[0, 1024, 37 * BS, 37 * BS + 5, 3 * BS, 2048, 0]])
    lod = torch.tensor([[2, 2, 1, 0, 1, 0, 0]])
    valid = torch.tensor([[True, True, True, True, True, True, False]])
    m = entry_match(z, span_start, lod, valid, BS, 2)
    assert m.tolist() == [[0.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0]]  # 2048: past the scored blocks; padding 0
    t = token_match(z, 64 * BS + 10, BS)
    assert t.shape == (1, 64 * BS + 10) and t[0, 37 * BS:38 * BS].eq(5.0).all() and t.sum() == 5.0 * BS


def test_fresh_match_lensnet_scores_zero_and_needs_the_match():
    lens = LensNet(64, layers=1, max_lod=2, match=True)
    R, L = 2, 9
    args = dict(embeddings=torch.randn(R, L, 64), lod=torch.zeros(R, L, dtype=torch.long),
                span_start=torch.arange(L).expand(R, L), span_len=torch.ones(R, L, dtype=torch.long),
                valid=torch.ones(R, L, dtype=torch.bool))
    assert lens(**args, match=torch.zeros(R, L)).eq(0).all()  # nothing singled out: no opinion
    with pytest.raises(ValueError, match="--lensnet_match"):
        lens(**args)
    with torch.no_grad():
        lens.match_gain.fill_(0.5)
    m = torch.rand(R, L)
    torch.testing.assert_close(lens(**args, match=m), torch.tanh(0.5 * m))


def test_refocus_opens_the_matching_block_inside_a_far_lod2_gist():
    """Covering: two LOD2 gists, LOD1 gists, a raw tail. Only block 41 (inside the second LOD2 unit, not
    its first child) matches; the network part scores nothing. Two allocator iterations make exactly
    that block raw: LOD2 -> LOD1 (the unit with the match), then the matching child, not child 0."""
    T = 2048 + 96
    lod0 = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(1))
    levels = MegaContextTree.build(lod0, GistNet(64, BS, gistnet_type="mean"), BS, 2).levels
    plan = torch.zeros(1, T, dtype=torch.int8)
    plan[:, :2048] = 2
    lens = LensNet(64, layers=1, max_lod=2, match=True).eval()
    with torch.no_grad():
        lens.match_gain.fill_(1.0)
    z = torch.zeros(1, 64)
    z[0, 41] = KEYMATCH_MIN_Z + 4.0
    cfg = MCConfig(allocator_iterations=2, recent_tokens=64)
    entries = 2 + 96
    new, _, info = refocus(lens, plan, levels, cfg, entries + 2 * (BS - 1), match_z=z, recent_tokens=64)
    expect = plan.clone()
    expect[:, 1024:2048] = 1
    expect[:, 41 * BS:42 * BS] = 0
    assert torch.equal(new, expect), (new[0, ::BS].tolist(), info["expands"])
    with pytest.raises(ValueError, match="match_z"):
        refocus(lens, plan, levels, cfg, entries + 62, recent_tokens=64)


def test_tail_block_scores_use_queries_after_the_scored_blocks():
    model = _gpt()
    emb = model.transformer.wte(torch.randint(0, 256, (2, 300)))
    z = tail_block_scores(model, emb, torch.tensor([300, 260]), 16, 224, BS)
    assert z.shape == (2, 7) and torch.isfinite(z).all()
    # the queries of row 1 are tokens [244, 260): the same as asking them one at a time
    x = layer0_inputs(model, emb)
    one = torch.stack([block_scores(layer0_keys(model, x[1:, :224]), layer0_query(model, x[1:, t]), BS,
                                    leave_one_out=True) for t in range(244, 260)]).amax(0)
    torch.testing.assert_close(z[1:], one, rtol=1e-4, atol=1e-4)  # einsum batching rounds differently
    assert tail_block_scores(model, emb, torch.tensor([20, 20]), 4, 16, BS).shape == (2, 0)  # no whole block


def test_leave_one_out_lets_a_lone_match_stand_out_among_few_blocks():
    """12 blocks, one key matches the query: the plain z is capped at sqrt(11) = 3.3 (the outlier inflates
    the std it is divided by); against the other blocks' spread it stands far out."""
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(1, 12 * BS, 1, 16, generator=g), dim=-1)
    query = torch.nn.functional.normalize(torch.randn(1, 1, 16, generator=g), dim=-1)
    keys[0, 5 * BS + 7, 0] = query[0, 0]
    plain, loo = block_scores(keys, query, BS), block_scores(keys, query, BS, leave_one_out=True)
    assert plain.argmax() == loo.argmax() == 5
    assert plain.max() <= 11 ** 0.5 + 1e-4 and loo.max() > 2 * plain.max()


def test_training_step_and_session_read_the_match():
    model = _gpt()
    cfg = MCConfig(lensnet_match=True, recent_tokens=64, num_random_variants=2, lensnet_layers=1)
    modules = MCModules.from_config(cfg, 64)
    modules.init_weights()
    with torch.no_grad():
        modules.lensnet.match_gain.fill_(0.3)
    x = torch.randint(0, 256, (2, 512))
    result = MCController(model, modules, cfg).process_batch(x, torch.roll(x, -1, 1), 0)
    result.loss.backward()
    assert modules.lensnet.match_gain.grad is not None
    session = MCSession(model, modules, cfg, W=192, refocus_interval=32)
    assert session.keys is not None  # the layer-0 key cache the match reads
    session.ingest(torch.randint(0, 256, (1500,)).tolist())
    session.refocus()
    assert session.num_entries <= 192
    assert torch.isfinite(session.next_logits()).all()


def test_best_first_lets_the_best_gists_child_beat_the_next_gist():
    """A LOD2 gist (best child scores 0.6) and three LOD1 gists at 0.4, room for two expands. Batched,
    the first iteration takes the LOD2 gist and a LOD1 gist and the child finds no room; best first,
    the child (0.6 > 0.4) is opened second."""
    from mc.allocator import allocate
    T = 1024 + 3 * BS + 64
    plan = torch.zeros(1, T, dtype=torch.int8)
    plan[:, :1024] = 2
    plan[:, 1024:1024 + 3 * BS] = 1
    scores = torch.zeros(1, T)
    scores[:, :1024] = 0.3
    scores[:, 7 * BS:8 * BS] = 0.6  # the child that matters (block 7), so the LOD2 gist's score is 0.6
    scores[:, 1024:1024 + 3 * BS] = 0.4
    entries = 1 + 3 + 64
    cfg = MCConfig(allocator_iterations=2, allocator_max_replacements=8)
    args = (plan, scores, entries + 2 * (BS - 1), cfg, BS, 2, 64)
    batched, _, _ = allocate(*args, scores_are_token_map=True)
    best, _, stats = allocate(*args, scores_are_token_map=True, best_first=True)
    assert int(batched[0, 7 * BS]) == 1 and int(best[0, 7 * BS]) == 0
    assert int(stats["expands"][0]) == 2 and best[0, 1024:].eq(plan[0, 1024:]).all()


def test_a_full_working_context_makes_room_to_open_the_matching_block():
    """The session's case: the WC is at its budget (no entries to spare), the question matches block 41
    inside a LOD2 gist. With room for two LOD2 -> raw openings made first (the lowest-scored groups
    collapse), block 41 ends raw and the entries stay <= W."""
    T = 2048 + 64 + 6 * BS
    lod0 = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(2))
    levels = MegaContextTree.build(lod0, GistNet(64, BS, gistnet_type="mean"), BS, 2).levels
    plan = torch.zeros(1, T, dtype=torch.int8)
    plan[:, :2048] = 2  # two LOD2 gists, then 6 raw blocks and the raw tail
    W = 2 + 6 * BS + 64  # exactly full
    lens = LensNet(64, layers=1, max_lod=2, match=True).eval()
    z = torch.zeros(1, (T - 64) // BS)
    z[0, 41] = KEYMATCH_MIN_Z + 4.0
    cfg = MCConfig(allocator_iterations=2, recent_tokens=64)
    new, _, info = refocus(lens, plan, levels, cfg, W, match_z=z, room=2 * 2 * (BS - 1))
    from mc.working_context import entry_counts
    assert int(new[0, 41 * BS]) == 0 and int(entry_counts(new, BS)[0]) <= W
    assert int(info["forced"][0]) > 0  # the room came from collapsing raw blocks
