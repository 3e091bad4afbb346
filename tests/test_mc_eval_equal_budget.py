"""
mc_eval at equal budgets: RECENCY-EQ / RECENCY-EQ-FOCUS read exactly the entries of MC / MC-fixed,
MC-KEYMATCH (parameter-free block scoring, mc/eval/keymatch_condition.py) expands the best-matching blocks and never
passes the budget, R_eq in the JSON and the table, validity coverage labels, and the exact-match figure.
"""

import numpy as np
import pytest
import torch

from mc.eval.conditions import (
    CONDITIONS,
    covering_plan,
    equal_entries_plan,
    expand_to_raw,
    fixed_focus_plan,
    plan_entries,
    recency_focus,
)
from mc.eval.data import Answer, EvalItem
from mc.eval.keymatch_condition import keymatch_focus, keymatch_plans, query_end, query_positions
from mc.eval.plot import em_panels, plot_exact_match, r_points
from mc.eval.report import summarize
from mc.eval.run import Setup, evaluate_batch
from mc.gistnet import GistNet
from mc.keymatch import block_scores, expand_blocks_to_raw, layer0_inputs
from mc.working_context import check_plan, entry_counts
from nanochat.gpt import GPT, GPTConfig

BS = 32


# ------------------------------------------------------------------ RECENCY-EQ
@pytest.mark.parametrize("T,W", [(2048, 512), (1024 + 256, 32), (128, 32), (64, 64)])
def test_recency_eq_reads_exactly_the_entries_of_mc_and_mc_fixed(T, W):
    for reference in (covering_plan(T, W, BS, 2), fixed_focus_plan(T, W, 4 * 31, BS, 2)):
        n = plan_entries(reference, BS)
        plan = equal_entries_plan(reference, BS)
        check_plan(plan[None], BS, max_lod=2)
        assert plan_entries(plan, BS) == n == int((plan == 0).sum())  # n raw entries, nothing else
        assert (plan[T - n:] == 0).all() and (plan[: T - n] == -1).all() and n >= min(W, T)
    # T = 2048, W = 512: 1 LOD2 + 16 LOD1 gists + 512 raw = 529, so RECENCY-EQ's cut 1519 is not block-aligned
    assert plan_entries(equal_entries_plan(covering_plan(2048, 512, BS, 2), BS), BS) == 529


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 0.1)
    return model.eval()


def test_evaluator_entries_match_and_every_condition_scores_the_same_window():
    T, W, E = 1024 + 256, 64, 4 * 31
    model = _tiny_model()
    mean = GistNet(64, BS, gistnet_type="mean")
    setup = Setup(model, mean, mean, W, W, BS, 2, "gaussian", 4, focus_budget=E)
    g = torch.Generator().manual_seed(1)
    items = [EvalItem(torch.randint(0, 500, (T + 1,), generator=g).tolist(), "text") for _ in range(2)]
    res, meta, _ = evaluate_batch(setup, items)
    for r, m in zip(res, meta):
        e = m["entries"]
        assert e["RECENCY"] == W and e["RECENCY-EQ"] == e["MC"] == e["MEANPOOL"] > W
        assert e["RECENCY-EQ-FOCUS"] == e["MC-fixed"] == e["MC"] + E
        assert e["MC"] < e["MC-KEYMATCH"] <= e["MC"] + E
        assert all(len(r[c][0]) == W for c in r)  # the same W window targets in every condition
        # more raw context than RECENCY changes the window's NLL
        assert not np.allclose(r["RECENCY"][0], r["RECENCY-EQ"][0])


# ------------------------------------------------------------------ MC-KEYMATCH, pure
def test_expand_blocks_to_raw_equals_expand_to_raw():
    T, W = 3 * 1024 + 256, 64
    base = covering_plan(T, W, BS, 2)
    g = torch.Generator().manual_seed(0)
    plans = torch.stack([recency_focus(base, plan_entries(base, BS) + 31 * k, T - W, BS) for k in range(6)])
    blocks = torch.randint(0, (T - W) // BS, (6,), generator=g)
    blocks[2] = -1  # a row left alone
    out = expand_blocks_to_raw(plans, blocks, BS, 2)
    check_plan(out, BS, max_lod=2)
    for r in range(6):
        b = int(blocks[r])
        expect = plans[r] if b < 0 else expand_to_raw(plans[r], [(b * BS, b * BS + 1)], BS)
        assert torch.equal(out[r], expect)


def test_block_scores_take_each_blocks_best_key_and_let_the_standout_head_speak():
    """max over the block's tokens (one needle token is enough), z-scored across blocks per head, max over
    heads; query head h reads kv head h // 2 (GQA)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 6 * BS, 2, 4, generator=g) * 0.1  # two kv heads, D = 4
    keys[0, 2 * BS + 17, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # one token of block 2, kv head 1
    keys[0, :, 0, 0] += 5.0  # kv head 0 matches every block alike (a positional head): no standout
    q = torch.zeros(1, 4, 4)  # four query heads: 0, 1 -> kv head 0, 2, 3 -> kv head 1
    q[0, :2, 0] = 1.0
    q[0, 2:, 2] = 1.0
    s = block_scores(keys, q, BS)
    assert s.shape == (1, 6) and int(s.argmax()) == 2
    assert s[0, 2] > 2.0  # a clear standout (z-score), not a near tie
    torch.testing.assert_close(block_scores(keys * 3.0, q, BS), s)  # scale-free per head (query gain)
    assert query_positions(torch.tensor([100, 0])).tolist() == [99, 0]


def test_query_ends_before_the_first_answer_in_the_window():
    T, W = 512, 128
    assert query_end([], T, W) == T  # no answer: the end of the history
    assert query_end([(T - 3, T + 1), (450, 452)], T, W) == 450  # the earliest answer in the window
    assert query_end([(100, 104), (T - 3, T + 1)], T, W) == T - 3  # answers before the cut do not count


def _rigged(R, T, cut, marked, seed=0):
    """Scores [R, T // bs]: random small, the marked blocks (row -> [blocks best first]) high."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(R, T // BS, generator=g) * 0.1
    for r, blocks in marked.items():
        for k, b in enumerate(blocks):
            scores[r, b] = 10.0 - k
    return scores


def test_keymatch_expands_the_best_matching_blocks_under_the_budget():
    T, W = 1024 + 256, 32  # cut 1248: LOD2 [0, 1024), 7 LOD1 gists [1024, 1248), 32 raw
    cut = T - W
    base = covering_plan(T, W, BS, 2).expand(3, T)
    n0 = plan_entries(base[0], BS)
    # row 0: best block 35 (a LOD1 gist: 31 entries); row 1: best block 5 (inside the LOD2 unit: 62);
    # row 2: best block 36, then 5, then 6
    scores = _rigged(3, T, cut, {0: [35], 1: [5], 2: [36, 5, 6]})
    one = keymatch_plans(base, scores, n0 + 31, cut, BS, 2)
    expect = base[0].clone()
    expect[35 * BS:36 * BS] = 0
    assert torch.equal(one[0], expect)
    # row 1: its best block costs 62 > 31, so the best block that fits (a LOD1 gist, 31) is taken instead
    lod1_best = 32 + int(scores[1, 32:39].argmax())
    expect = base[1].clone()
    expect[lod1_best * BS:(lod1_best + 1) * BS] = 0
    assert torch.equal(one[1], expect)
    check_plan(one, BS, max_lod=2)
    assert (entry_counts(one, BS) <= n0 + 31).all()
    plans = keymatch_plans(base, scores, n0 + 124, cut, BS, 2)
    check_plan(plans, BS, max_lod=2)
    assert (plans[1, 5 * BS:6 * BS] == 0).all() and (plans[1, :1024][plans[1, :1024] != 0] == 1).all()
    assert (plans[2, 36 * BS:37 * BS] == 0).all() and (plans[2, 5 * BS:7 * BS] == 0).all()
    assert int(entry_counts(plans[2:], BS)) == n0 + 31 + 62 + 31  # 36, then 5 (opens the unit), then 6
    assert (entry_counts(plans, BS) <= n0 + 124).all() and (plans[:, cut:] == 0).all()


def test_keymatch_never_passes_the_budget_and_stops_only_when_nothing_fits():
    T, W = 2 * 1024 + 512, 64
    cut = T - W
    g = torch.Generator().manual_seed(3)
    base = covering_plan(T, W, BS, 2).expand(8, T)
    n0 = plan_entries(base[0], BS)
    for budget_extra in (0, 30, 31, 61, 62, 124, 500):
        scores = torch.randn(8, T // BS, generator=g)
        plans = keymatch_plans(base, scores, n0 + budget_extra, cut, BS, 2)
        check_plan(plans, BS, max_lod=2)
        n = entry_counts(plans, BS)
        assert (n <= n0 + budget_extra).all() and (plans[:, cut:] == 0).all()
        cost = 31 * plans[:, torch.arange(cut // BS) * BS].long()  # what each block not yet raw still costs
        left = n0 + budget_extra - n
        assert not ((cost > 0) & (cost <= left[:, None])).any()  # greedy stopped: nothing else fits


@pytest.mark.parametrize("prev_token_mix", [False, True])
def test_layer0_inputs_are_what_the_gpt_feeds_its_first_attention(prev_token_mix):
    """The keys MC-KEYMATCH pools are the GPT's own layer-0 keys (up to rotary): the input it computes from
    the embeddings equals what block 0's attention receives in a real forward."""
    if prev_token_mix and "prev_token_mix" not in GPTConfig.__dataclass_fields__:
        pytest.skip("this GPT has no previous-token mix")
    torch.manual_seed(0)
    extra = {"prev_token_mix": True} if prev_token_mix else {}
    model = GPT(GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, **extra))
    model.init_weights()
    ids = torch.randint(0, 512, (2, 64))
    seen = {}
    hook = model.transformer.h[0].attn.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids)
        mine = layer0_inputs(model, model.transformer.wte(ids))
    hook.remove()
    torch.testing.assert_close(mine, seen["x"], rtol=1e-5, atol=1e-5)


def test_keymatch_focus_matches_the_question_not_the_answer():
    """A GPT whose layer-0 c_q = c_k = identity: a block made of the question's token scores highest; the
    answer's token fills another block, which must not win (the answer is never a query token)."""
    T, W, X, Y = 1024 + 256, 64, 7, 9
    model = _tiny_model()
    with torch.no_grad():
        attn = model.transformer.h[0].attn
        attn.c_q.weight.copy_(torch.eye(64))
        attn.c_k.weight.copy_(torch.eye(64))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 500, (2, T + 1), generator=g)
    ids[:, 1056:1088] = X  # block 33: the question's token (a LOD1 gist)
    ids[:, 1120:1152] = Y  # block 35: the answer's token
    ids[:, T - 11:T - 6] = X  # the question (5 tokens), right before the answer
    ids[:, T - 6:T + 1] = Y  # the answer: ids[T - 6 .. T], its first target is predicted at T - 7
    spans = [[(T - 6, T + 1)], [(T - 6, T + 1)]]
    with torch.no_grad():
        plans = keymatch_focus(model, model.transformer.wte(ids[:, :T]), spans, W, 31, BS, 2)
    base = covering_plan(T, W, BS, 2)
    expect = base.clone()
    expect[1056:1088] = 0
    assert torch.equal(plans[0], expect) and torch.equal(plans[1], expect)
    # keyed on the last 8 history tokens instead (2 of the question's, 6 of the answer's), block 35 would win
    with torch.no_grad():
        leaky = keymatch_focus(model, model.transformer.wte(ids[:, :T]), [[], []], W, 31, BS, 2)
    assert (leaky[0, 1120:1152] == 0).all()


# ------------------------------------------------------------------ JSON, table, coverage, figure
NLL = {"FULL": 1.0, "RECENCY": 2.0, "RECENCY-EQ": 1.8, "RECENCY-EQ-FOCUS": 1.6, "MEANPOOL": 1.9, "MC": 1.5,
       "MC-fixed": 1.45, "MC-KEYMATCH": 1.3, "MC-LensNet": 1.2, "SHUFFLED": 2.1, "ORACLE": 1.1}
ENTRIES = {"FULL": 128, "RECENCY": 32, "RECENCY-EQ": 35, "RECENCY-EQ-FOCUS": 128, "MEANPOOL": 35, "MC": 35,
           "MC-fixed": 128, "MC-KEYMATCH": 128, "MC-LensNet": 97, "SHUFFLED": 35, "ORACLE": 128}


def _stats(gap_scale, full_recalls):
    rng = np.random.default_rng(0)
    meta = {"entries": dict(ENTRIES), "lens": None}
    sets, recalls = [], []
    for _ in range(12):
        n = int(rng.integers(10, 30))
        noise = rng.normal(0, 0.01)
        per = {c: ((1.0 + (v - 1.0) * gap_scale + noise) * n, n) for c, v in NLL.items()}
        sets.append({"horizon": per, "boundary": per, "long_range": per})
        recalls.append({c: [c in ("FULL", "ORACLE")] * 2 for c in NLL})
    docs = {"sets": sets, "recalls": recalls, "meta": [meta] * 12, "diagnostic": [None] * 12}
    probe = lambda T: EvalItem([0] * (T + 1), "probe", [Answer((T - 1, T + 1), 10, "passkey", True)],
                               info={"fact": "passkey", "straddle": False})
    probes = {m: [(probe(32 * m), {c: [c in ("FULL", "ORACLE") and full_recalls] for c in NLL if c != "FULL" or m == 4},
                   meta)] * 10 for m in (4, 16)}
    return docs, probes


def test_json_has_entries_and_gap_recovery_against_both_recencies(tmp_path):
    docs, probes = _stats(1.0, True)
    settings = {"gists": "learned", "boundary_tokens": 64, "doc_tokens": 128}
    result, md, summary = summarize(settings, docs, probes, [], 200, 0)
    assert result["valid"] and result["mean_wc_entries"] == {c: float(v) for c, v in ENTRIES.items()}
    for block in result["probes"].values():
        assert set(block["mean_wc_entries"]) == set(CONDITIONS)
    lr = result["nll"]["long_range"]
    r, r_eq, r_eqf = lr["gap_recovery"]["MC"], lr["gap_recovery_eq"]["MC"], lr["gap_recovery_eq_focus"]["MC-KEYMATCH"]
    assert r["value"] == pytest.approx(0.5, abs=0.02) and r_eq["value"] == pytest.approx(0.3 / 0.8, abs=0.02)
    assert r_eqf["value"] == pytest.approx(0.3 / 0.6, abs=0.02) and r_eq["lo"] <= r_eq["value"] <= r_eq["hi"]
    assert lr["gap_recovery_eq"]["RECENCY-EQ"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert summary["gap recovery horizon vs RECENCY-EQ"] == pytest.approx(0.3 / 0.8, abs=0.02)
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    assert "R_eq long-range answers (vs RECENCY-EQ)" in rows and "R_eq-focus horizon (vs RECENCY-EQ-FOCUS)" in rows
    assert rows["R horizon"].startswith("| R horizon | 1 (ref) | 0 (ref) | 0.20")  # FULL, RECENCY, RECENCY-EQ
    assert rows["R_eq horizon (vs RECENCY-EQ)"].split(" | ")[1:4] == ["1 (ref)", "-0.25 [-0.25, -0.25]", "0 (ref)"]
    assert rows["mean WC entries (docs)"].count("| 35 |") >= 1 and "not covered" not in md.split("GistNet")[0]
    assert all(result["covered_by_validity"].values()) and result["nll"]["horizon"]["covered_by_validity"]
    # the figure: probes at 4xW and 16xW, one line per condition; FULL only where it ran
    panels = em_panels(result)
    assert [t for t, _ in panels] == ["needle probes", "document long-range recalls"]
    assert [x for x, _, _ in panels[0][1]] == [128, 512] and "FULL" not in panels[0][1][1][1]
    path = plot_exact_match(result, str(tmp_path / "em.png"))
    assert path and (tmp_path / "em.png").stat().st_size > 1000
    # and the documents' R per window, with the same numbers as the JSON
    rs = r_points(result)
    assert [w for w, _, _ in rs] == ["horizon", "boundary", "long_range"] and all(c for _, _, c in rs)
    assert rs[2][1]["MC"] is lr["gap_recovery"]["MC"]


def test_figures_no_verdict_covers_are_labelled():
    docs, probes = _stats(0.01, False)  # no FULL-RECENCY gap, FULL cannot recall: nothing is covered
    settings = {"gists": "learned", "boundary_tokens": 64, "doc_tokens": 128}
    result, md, summary = summarize(settings, docs, probes, [{c: [False] for c in NLL}], 200, 0)
    assert not result["valid"] and not any(result["covered_by_validity"].values())
    assert set(result["covered_by_validity"]) == {"nll.horizon", "nll.boundary", "nll.long_range", "doc_recalls",
                                                  "probes.4xW", "probes.16xW", "tasks"}
    assert result["nll"]["horizon"]["covered_by_validity"] is False and result["probes"]["4xW"]["covered_by_validity"] is False
    lr = result["nll"]["long_range"]
    assert lr["gap_recovery"] is None and lr["gap_recovery_eq"] is None and lr["gap_recovery_eq_focus"] is None
    assert "gap_recovery_eq_unvalidated" in lr
    for line in md.splitlines():
        if line.startswith(("| NLL", "| R", "| probe EM", "| doc recall", "| task EM", "|   passkey")):
            assert "(not covered by validity)" in line, line
        if line.startswith("| R long-range"):
            assert "NOT VALID" in line
    assert "nll.horizon" in summary["not covered by validity"]
    assert result["comparisons"]["MC-LensNet vs MC-fixed"]["probe EM 4xW"].endswith("(not covered by validity)")


def test_a_match_at_the_end_of_a_block_carries_into_the_next_one():
    """The continuation rule (mc/keymatch.py): the value that follows a match in the last CONTINUATION tokens
    of block b may lie in block b + 1, which then scores at least block b's z; a match early in its block
    carries nothing."""
    from mc.keymatch import CONTINUATION, EDGE_TIE
    keys = torch.zeros(1, 8 * BS, 1, 2)
    keys[0, :, 0, 1] = 1.0  # every token matches a little
    q = torch.tensor([[[1.0, 0.1]]])
    keys[0, 3 * BS - 2, 0] = torch.tensor([5.0, 0.0])  # block 2, two tokens before its end
    keys[0, 5 * BS + 3, 0] = torch.tensor([4.0, 0.0])  # block 5, near its start
    s = block_scores(keys, q, BS)[0]
    assert s[2] == s.max() and s[3] == pytest.approx(float(s[2]) - EDGE_TIE)  # block 3 inherits, a hair below
    assert s[6] < 1.0 < s[5]  # no carry from an early match
    assert 3 * BS - 2 >= 3 * BS - CONTINUATION


def test_a_match_at_the_start_of_a_block_carries_into_the_previous_one():
    """The cue the previous-token mix read lies before a match at a block's start: block b - 1 inherits."""
    keys = torch.zeros(1, 8 * BS, 1, 2)
    keys[0, :, 0, 1] = 1.0
    keys[0, 4 * BS + 1, 0] = torch.tensor([5.0, 0.0])  # the second token of block 4
    s = block_scores(keys, torch.tensor([[[1.0, 0.1]]]), BS)[0]
    assert s[4] == s.max() and s[3] == pytest.approx(float(s[4]) - 1e-3) and s[5] < s[3]
