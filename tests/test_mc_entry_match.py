"""The content-matching LensNet's refocus on the entry list (mc.focus.refocus_entries with match_z, O(W)) against
the per-token refocus (mc.focus.refocus): the same plan, hysteresis and stats on random plans, block scores,
room and knobs, twice in a row; the keymatch refocus on the entry list (mc.keymatch.keymatch_refocus) against
the per-token one it replaced; and the pieces on their own (span scores over any span, mark overlay)."""

import dataclasses

import torch

from mc.allocator import PlanDoesNotFitError, allocate
from mc.config import MCConfig
from mc.entry_allocator import SpanScores, marks_from_state, overlay_marks, state_from_marks
from mc.focus import refocus, refocus_entries
from mc.gistnet import GistNet
from mc.infer.session import MCSession
from mc.keymatch import KEYMATCH_MAX_BLOCKS, KEYMATCH_MIN_Z, expand_blocks_to_raw, keymatch_refocus
from mc.lensnet import LensNet
from mc.train.variants import sample_compressed_plans
from mc.tree import MegaContextTree, min_variant_entries
from mc.working_context import build_working_context, check_plan, entry_starts

C = 32


def to_plan(start, lod, bs):
    return lod.repeat_interleave(bs ** lod).to(torch.int8)[None]


def random_case(seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    bs, max_lod = pick(4, 8), pick(2, 3)
    T = int(torch.randint(bs ** max_lod * 2, bs ** max_lod * 6, (1,), generator=g))
    R = pick(1, bs, 3 * bs)
    e_min = min_variant_entries(T, bs, max_lod, R)
    W = int(torch.randint(e_min + 1, e_min + 6 * bs, (1,), generator=g))
    plan = sample_compressed_plans(1, T, int(torch.randint(e_min, W + 1, (1,), generator=g)), bs, max_lod, R,
                                   generator=g)
    levels = MegaContextTree.build(torch.randn(1, T, C, generator=g), GistNet(C, bs, gistnet_type="mean"), bs,
                                   max_lod).levels
    lens = LensNet(C, layers=1, max_lod=max_lod, match=True).eval()
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        lens.match_gain.fill_(float(torch.rand(1, generator=g)) + 0.2)
    z = torch.randn(1, (T - R) // bs, generator=g)
    hits = torch.randint(z.size(1), (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
    z[0, hits] = KEYMATCH_MIN_Z + 4 * torch.rand(hits.numel(), generator=g)  # blocks the question singles out
    cfg = MCConfig(block_size=bs, max_lod=max_lod, recent_tokens=R, allocator_iterations=pick(1, 2, 3),
                   allocator_max_replacements=pick(1, 3, 8), allocator_type=pick("greedy", "stochastic_greedy"),
                   allocator_expand_threshold=pick(0.0, 0.1, 0.3), allocator_collapse_threshold=pick(-0.1, -0.3))
    room = pick(0, 2 * max_lod * (bs - 1))
    return plan, levels, lens, z, cfg, W, room, seed


def both(plan, levels, lens, z, cfg, W, room, seed, state=None):
    """(per-token (plan, state, stats), entry-list (plan, state, stats)) of one refocus on the same input."""
    T = plan.size(1)
    try:
        ref = refocus(lens, plan, levels, cfg, W, state=state, generator=torch.Generator().manual_seed(seed),
                      match_z=z, room=room)
    except PlanDoesNotFitError:
        ref = None
    wc = build_working_context(plan, levels, cfg.block_size, align="right")
    try:
        start, lod, marks, _, info = refocus_entries(lens, wc, cfg, W, max(T - cfg.recent_tokens, 0),
                                                     marks_from_state(state), torch.Generator().manual_seed(seed),
                                                     match_z=z, room=room)
    except PlanDoesNotFitError:
        return ref, None
    return ref, (to_plan(start, lod, cfg.block_size), state_from_marks(marks, T), info)


def test_the_entry_refocus_with_the_content_match_makes_the_per_token_refocus_edits():
    edits = opened = 0
    for seed in range(40):
        plan, levels, lens, z, cfg, W, room, _ = case = random_case(seed)
        ref, got = both(*case)
        assert (ref is None) == (got is None), seed
        if ref is None:
            continue
        check_plan(got[0], cfg.block_size, max_lod=cfg.max_lod)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), seed
        for k in ("expands", "collapses", "forced"):
            assert torch.equal(got[2][k], ref[2][k]), (seed, k)
        edits += int(ref[2]["expands"][0] + ref[2]["collapses"][0] + ref[2]["forced"][0])
        hit = (z[0] >= KEYMATCH_MIN_Z).nonzero()[:, 0] * cfg.block_size
        opened += int((ref[0][0, hit] == 0).sum()) if hit.numel() else 0
        # again on the new plan with this call's hysteresis and new block scores
        new_levels = levels  # the tree does not change with the plan
        z2 = z.roll(1, 1)
        ref2, got2 = both(ref[0], new_levels, lens, z2, cfg, W, room, seed + 1, state=ref[1])
        if ref2 is not None:
            assert torch.equal(got2[0], ref2[0]) and torch.equal(got2[1], ref2[1]), seed
    assert edits > 40 and opened > 5  # the cases really edit, and open matched blocks


def test_span_scores_read_any_span_of_a_piecewise_constant_map():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        T = int(torch.randint(5, 300, (1,), generator=g))
        cuts = torch.cat([torch.tensor([0]), (torch.randperm(T - 1, generator=g)[:20] + 1).sort().values])
        ends = torch.cat([cuts[1:], torch.tensor([T])])
        score = (torch.randint(-64, 65, (cuts.numel(),), generator=g) / 64).double()
        token_map = score.repeat_interleave(ends - cuts)
        qs = torch.randint(0, T, (50,), generator=g)
        qe = qs + 1 + (torch.rand(50, generator=g) * (T - qs)).long().clamp(max=T - qs - 1)
        mean, best = SpanScores(cuts, ends, score)(qs, qe)
        want_mean = torch.stack([token_map[a:b].mean() for a, b in zip(qs.tolist(), qe.tolist())]).float()
        want_max = torch.stack([token_map[a:b].max() for a, b in zip(qs.tolist(), qe.tolist())]).float()
        torch.testing.assert_close(mean, want_mean, atol=1e-6, rtol=0)
        assert torch.equal(best, want_max)


def test_overlaid_marks_are_the_per_token_where():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        T = 60
        under = torch.randint(-1, 2, (1, T), generator=g).to(torch.int8)
        over = torch.zeros(1, T, dtype=torch.int8)
        for _ in range(3):
            a = int(torch.randint(0, T - 5, (1,), generator=g))
            over[0, a:a + int(torch.randint(1, 6, (1,), generator=g))] = 1 if bool(torch.rand(1, generator=g) < .5) else -1
        got = state_from_marks(overlay_marks(marks_from_state(under), marks_from_state(over)), T)
        assert torch.equal(got, torch.where(over != 0, over, under))


def test_the_entry_refocus_opens_the_matching_block_inside_a_far_gist():
    """As tests/test_mc_lens_match.py's per-token case: only block 41 matches; two iterations open exactly it."""
    bs, T = 32, 2048 + 96
    levels = MegaContextTree.build(torch.randn(1, T, C, generator=torch.Generator().manual_seed(1)),
                                   GistNet(C, bs, gistnet_type="mean"), bs, 2).levels
    plan = torch.zeros(1, T, dtype=torch.int8)
    plan[:, :2048] = 2
    lens = LensNet(C, layers=1, max_lod=2, match=True).eval()
    with torch.no_grad():
        lens.match_gain.fill_(1.0)
    z = torch.zeros(1, 64)
    z[0, 41] = KEYMATCH_MIN_Z + 4.0
    cfg = MCConfig(allocator_iterations=2, recent_tokens=64)
    wc = build_working_context(plan, levels, bs, align="right")
    start, lod, _, edits, _ = refocus_entries(lens, wc, cfg, 98 + 2 * (bs - 1), T - 64, match_z=z)
    assert int(entry_starts(to_plan(start, lod, bs), bs).sum()) == start.numel()
    want = plan.clone()
    want[:, 1024:2048] = 1
    want[:, 41 * bs:42 * bs] = 0
    assert torch.equal(to_plan(start, lod, bs), want) and len(edits) == 2


def test_a_content_matching_sessions_refocus_makes_the_per_token_refocus_edits():
    """The session (--lensnet_match=1) refocuses on its entry list; mc.focus.refocus on the whole per-token plan,
    given the same block scores, room, hysteresis and draws, makes the same plan and state. A planted repeat
    (the history's last tokens also appear early on) makes some blocks stand out, so the room path runs."""
    from tests.test_mc_session import tiny_mc_model

    model, modules, cfg = tiny_mc_model(seed=4, random_lens=False, lensnet_match=True,
                                        allocator_type="stochastic_greedy", allocator_expand_threshold=0.05,
                                        allocator_collapse_threshold=-0.05)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for p in modules.lensnet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        modules.lensnet.match_gain.fill_(1.0)
    s = MCSession(model, modules, cfg)
    assert s.match
    ids = torch.randint(0, 256, (600,), generator=g)
    s.ingest(ids.tolist())
    rooms = edits = 0
    for step in range(12):
        s.ingest(ids[40 * step: 40 * step + 5].tolist())  # a repeat of an early stretch: its blocks match
        plan, state = s.plan.clone(), s.state
        z, room = s._lens_match()
        draws = torch.Generator()
        draws.set_state(s.generator.get_state())
        want, want_state, _ = refocus(s.lensnet, plan, None, s.cfg, s.fit_budget, state=state, generator=draws,
                                      wc=s.working_context(), match_z=z, room=room)
        s.refocus()
        rooms += room > 0
        edits += s.last["expands"] + s.last["collapses"]
        assert s.num_entries <= s.W and torch.equal(s.plan, want) and torch.equal(s.state, want_state), step
    assert edits >= 4 and rooms >= 1, (edits, rooms)  # 4 edits, 1 room on this seed


def per_token_keymatch_refocus(plan, z, W, cfg, recent_tokens):
    """The keymatch refocus as it was written on the per-token plan (O(T)): the reference the entry-list one
    (mc.keymatch.keymatch_refocus) is held to."""
    bs, max_lod = cfg.block_size, cfg.max_lod
    T = plan.size(1)
    z = z[:, :max(T - recent_tokens, 0) // bs].float()
    asked = [int(b) for b in z.argsort(1, descending=True)[0, :KEYMATCH_MAX_BLOCKS] if z[0, b] >= KEYMATCH_MIN_Z]
    chosen = [b for b in asked if int(plan[0, b * bs]) > 0]
    hard = dataclasses.replace(cfg, allocator_expand_threshold=2.0, allocator_collapse_threshold=-2.0)
    oldest_first = torch.arange(T, dtype=torch.float32)[None] / T - 1.0
    for b in asked:
        oldest_first[:, b * bs:(b + 1) * bs] = 1.0
    for n in range(len(chosen), -1, -1):
        reserve = n * max_lod * (bs - 1)
        if W - reserve < 1:
            continue
        try:
            new_plan, new_state, stats = allocate(plan, oldest_first, W - reserve, hard, bs, max_lod, recent_tokens,
                                                  scores_are_token_map=True)
        except PlanDoesNotFitError:
            if n == 0:
                raise
            continue
        if n and any(int(new_plan[0, b * bs]) != 0 for b in asked if b not in chosen):
            continue
        for b in chosen[:n]:
            new_plan = expand_blocks_to_raw(new_plan, torch.tensor([b]), bs, max_lod)
            new_state[:, b * bs:(b + 1) * bs] = 1
        stats["expands"] = torch.tensor([n])
        return new_plan, new_state, stats


def test_the_keymatch_refocus_on_entries_makes_the_per_token_edits():
    checked = opened = 0
    for seed in range(60):
        plan, _, _, z, cfg, W, _, _ = random_case(seed)
        if seed % 3 == 0:  # an asked block that is raw already, as after an earlier refocus for the same question
            b = int(z.argmax())
            plan = expand_blocks_to_raw(plan, torch.tensor([b]), cfg.block_size, cfg.max_lod)
            W = max(W, int(entry_starts(plan, cfg.block_size).sum()))
        T, R = plan.size(1), cfg.recent_tokens
        try:
            want = per_token_keymatch_refocus(plan, z, W, cfg, R)
        except PlanDoesNotFitError:
            want = None
        start = entry_starts(plan, cfg.block_size, max_level=cfg.max_lod)[0].nonzero()[:, 0]
        try:
            s, lod, marks, _, stats = keymatch_refocus(start, plan[0, start].long(), z, W, cfg, T - R)
        except PlanDoesNotFitError:
            assert want is None, seed
            continue
        got = to_plan(s, lod, cfg.block_size)
        assert torch.equal(got, want[0]) and torch.equal(state_from_marks(marks, T), want[1]), seed
        for k in ("expands", "collapses", "forced"):
            assert torch.equal(stats[k], want[2][k]), (seed, k)
        checked += 1
        opened += int(stats["expands"][0])
    assert checked > 40 and opened > 10, (checked, opened)
