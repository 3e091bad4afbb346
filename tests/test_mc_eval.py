"""
scripts/mc_eval.py and its pure parts: condition plans, token-set masks, the char -> token offset
mapping, probe/task construction, bootstrap statistics, the batched evaluator against a direct GPT
forward, and an end-to-end run on a tiny saved checkpoint (untrained -> valid=false).
"""

import json

import numpy as np
import pytest
import torch

from mc.eval.conditions import (
    answer_mask,
    char_byte_offsets,
    char_span_to_tokens,
    covering_plan,
    diagnostic_plans,
    expand_to_raw,
    is_long_range,
    nearest_source,
    oracle_plan,
    recency_plan,
    token_byte_starts,
    window_masks,
)
from mc.eval.data import EvalItem, doc_item, probe_item, task_item
from mc.eval.stats import bootstrap_ci, gap_recovery, paired_bootstrap, resample_indices
from mc.gistnet import GistNet
from mc.train.variants import baseline_plan
from mc.working_context import check_plan, entry_counts
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.synthetic import Recall, synthetic_texts
from scripts import mc_eval
from tests.conftest import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer()


@pytest.fixture(scope="module")
def piece_bytes(tok):
    return tok.token_bytes().numpy()


# ------------------------------------------------------------------ plans
def test_covering_plan_is_the_coarsest_legal_covering():
    T, W = 4096, 512
    plan = covering_plan(T, W, 32, 2)
    check_plan(plan[None], 32, max_lod=2)
    assert (plan[:3072] == 2).all() and (plan[3072:3584] == 1).all() and (plan[3584:] == 0).all()
    assert entry_counts(plan[None], 32).item() == 3 + 16 + 512
    assert (covering_plan(64, 128, 32) == 0).all()  # the history fits the window: no gists
    assert (covering_plan(1024 + 32, 32, 32, 1) == torch.tensor([1] * 1024 + [0] * 32, dtype=torch.int8)).all()
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        covering_plan(100, 32, 32)
    assert torch.equal(recency_plan(100, 30), baseline_plan(100, 30))


def test_oracle_expands_the_needle_blocks_only():
    T, W, bs = 4096, 512, 32
    base = covering_plan(T, W, bs, 2)
    plan = oracle_plan(T, W, [(1040, 1050)], bs, 2)  # inside the second LOD2 unit [1024, 2048), block 32
    check_plan(plan[None], bs, max_lod=2)
    assert (plan[1024:1056] == 0).all()  # the block raw
    assert (plan[1056:2048] == 1).all()  # the rest of its LOD2 unit now LOD1
    assert torch.equal(plan[:1024], base[:1024]) and torch.equal(plan[2048:], base[2048:])
    straddle = oracle_plan(T, W, [(3100, 3110), (3110, 3120)], bs, 2)  # blocks 96 and 97 (LOD1 region)
    assert (straddle[3072:3136] == 0).all() and (straddle[3136:3168] == 1).all()
    assert torch.equal(expand_to_raw(base, [(4000, 4010)], bs), base)  # already raw: unchanged
    assert entry_counts(straddle[None], bs).item() == entry_counts(base[None], bs).item() + 2 * 31


def test_diagnostic_plans():
    p = diagnostic_plans(block_start=64, context=32, following=16, block_size=32)
    assert p["raw"].numel() == 64 + 32 + 16
    assert (p["raw"][:32] == -1).all() and (p["raw"][32:] == 0).all()
    assert (p["gist"][64:96] == 1).all() and torch.equal(p["gist"][:64], p["raw"][:64])
    check_plan(p["gist"][None], 32)


# ------------------------------------------------------------------ token sets and offsets
def test_window_masks_and_long_range_indexing():
    T, W, H = 100, 40, 10  # cut = 60; window targets i = t - 60 predict ids[t + 1]
    m = window_masks(T, W, H, boundary=5)
    assert m["horizon"].tolist() == [False] * 30 + [True] * 10 and m["boundary"].sum() == 5
    # answer tokens ids[95:98] are the targets of t = 94..96, window indices 34..36
    assert np.flatnonzero(answer_mask(T, W, [(95, 98)])).tolist() == [34, 35, 36]
    assert answer_mask(T, W, [(10, 20)]).sum() == 0  # before the window
    assert is_long_range((95, 98), source_end=60, T=T, W=W, H=H)
    assert not is_long_range((95, 98), source_end=61, T=T, W=W, H=H)  # source reaches into the window
    assert not is_long_range((85, 88), source_end=10, T=T, W=W, H=H)  # answer outside the horizon
    with pytest.raises(ValueError, match="horizon"):
        window_masks(T, W, 41)


def test_offset_mapping_roundtrip_with_multibyte_text(tok, piece_bytes):
    text = "Zoë Brandt lives in Kraków. The passkey for the blue vault is 48213. Olá!"
    ids = [tok.get_bos_token_id()] + tok.encode(text)
    starts = token_byte_starts(piece_bytes[np.asarray(ids)])
    cb = char_byte_offsets(text)
    assert cb[-1] == len(text.encode())
    for word in ("48213", "Kraków", "Zoë", "blue vault", "Olá"):
        a = text.index(word)
        u0, u1 = char_span_to_tokens(a, a + len(word), cb, starts)
        decoded = tok.decode(ids[u0:u1])
        assert word in decoded and len(decoded) <= len(word) + 2, (word, decoded)
        assert u0 >= 1  # never the BOS
    assert char_span_to_tokens(0, 1, cb, starts)[0] == 1


def test_nearest_source_prefers_a_later_repetition():
    text = "The code is 4821. filler filler. What is the code? 4821. more. Again: 4821."
    first = text.index("4821")
    second = text.index("4821", first + 1)
    third = text.index("4821", second + 1)
    recalls = [Recall(4, second, second + 4, "passkey"), Recall(4, third, third + 4, "passkey")]
    assert nearest_source(text, recalls, 0) == (first, first + 4)
    assert nearest_source(text, recalls, 1) == (second, second + 4)


# ------------------------------------------------------------------ items
def test_doc_item_answers_decode_to_the_recalled_values(tok, piece_bytes):
    T, W, H = 512, 128, 128
    item = doc_item(tok, piece_bytes, 3, T, W, H)
    assert len(item.ids) == T + 1 and item.ids[0] == tok.get_bos_token_id()
    assert item.answers and any(a.long_range for a in item.answers)
    for a in item.answers:
        text = tok.decode(item.ids[a.span[0]: a.span[1]]).strip(" ?.,")
        assert text and a.span[1] <= T + 1
        if a.long_range:
            assert a.source_end <= T - W and a.span[0] - 1 >= T - H
            assert text in tok.decode(item.ids[:a.source_end])  # the value was seen before the cut
    for a, b in item.needles:
        assert 1 <= a < b <= T


@pytest.mark.parametrize("kind", ["passkey", "kv"])
@pytest.mark.parametrize("straddle", [False, True])
def test_probe_item_places_the_needle(tok, kind, straddle):
    T, W, bs = 512, 128, 32
    item = probe_item(tok, 5, T, W, bs, kind, straddle)
    assert len(item.ids) == T + 1 and item.kind == "probe"
    (ans,) = item.answers
    assert ans.span == (T + 1 - (ans.span[1] - ans.span[0]), T + 1) and ans.long_range
    assert tok.decode(item.ids[ans.span[0]: ans.span[1]]).endswith(".")
    value = tok.decode(item.ids[ans.span[0]: ans.span[1] - 1])
    assert value.isdigit()
    a = item.info["value_token"]
    n = ans.source_end - a
    assert tok.decode(item.ids[a: a + n]) == value  # the needle's value tokens
    assert ((a // bs) != ((a + n - 1) // bs)) == straddle
    (needle,) = item.needles
    assert needle[1] <= T - W  # the whole needle before the cut
    query = tok.decode(item.ids[needle[1]:ans.span[0]])
    cue = "passkey for the" if kind == "passkey" else "'s value?"
    assert cue in query and query.count(value) == 0


def test_a_haystack_that_names_every_vault_is_regrown_without_the_cue(tok, monkeypatch):
    """Past ~250K tokens a synthetic haystack names all 200 vaults; the probe then regrows it without its cue,
    so the question's vault is stated once in the whole history (here: "every vault" = the few a short
    haystack names, to keep the test small)."""
    import re

    import mc.eval.data as data
    from nanochat.synthetic import synthetic_document

    T, W, bs = 512, 128, 32
    plain = probe_item(tok, 5, T, W, bs, "passkey", False)
    text = tok.decode(plain.ids)
    named = sorted({v for v in data.ALL_VAULTS if v in text})
    monkeypatch.setattr(data, "ALL_VAULTS", named)  # every vault there is is in the haystack
    item = probe_item(tok, 5, T, W, bs, "passkey", False)
    history = tok.decode(item.ids[:item.needles[0][1]])
    (cue,) = re.findall(r"What is the passkey for the (.+?)\?", tok.decode(item.ids))
    assert cue in named and history.count(cue) == 1  # stated once: in the needle
    assert cue not in synthetic_document(3, "val", 0, target_chars=20000, reserved_vaults=(cue,)).text


def test_task_item_aligns_the_cut(tok, piece_bytes):
    ctx = "Some words here. " * 20 + "The passkey for the red door is 7351. " + "More filler text. " * 30
    item = task_item(tok, piece_bytes, {"context": ctx, "question": "What is the passkey for the red door?",
                                        "answer": "7351"}, W=64, H=64, block_size=32)
    assert (item.T - 64) % 32 == 0
    (ans,) = item.answers
    assert tok.decode(item.ids[ans.span[0]:ans.span[1]]).strip() == "7351" and ans.span[1] == item.T + 1
    (needle,) = item.needles
    assert tok.decode(item.ids[needle[0]:needle[1]]).strip() == "7351"
    assert ans.long_range == (needle[1] <= item.T - 64)


# ------------------------------------------------------------------ statistics
def test_bootstrap_ci_mean_and_weights():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    ci = bootstrap_ci(v, n_boot=500, seed=1)
    assert ci["value"] == 2.5 and ci["lo"] <= 2.5 <= ci["hi"] and ci["n_docs"] == 4
    assert bootstrap_ci(v, n_boot=500, seed=1) == ci  # deterministic in the seed
    w = np.array([1.0, 0.0, 0.0, 3.0])
    assert bootstrap_ci(v, 100, 0, weights=w)["value"] == pytest.approx((1 + 12) / 4)
    assert bootstrap_ci([5.0] * 3, 100, 0) == {"value": 5.0, "lo": 5.0, "hi": 5.0, "n_docs": 3}
    assert bootstrap_ci([], 100, 0)["value"] is None


def test_gap_recovery_is_computed_per_paired_replicate():
    rng = np.random.default_rng(0)
    D = 30
    counts = rng.integers(5, 50, D).astype(float)
    full = rng.uniform(1.0, 2.0, D) * counts
    rec = full + rng.uniform(0.2, 0.6, D) * counts
    half = (full + rec) / 2
    out = paired_bootstrap({"FULL": full, "RECENCY": rec, "MC": half}, counts, n_boot=400, seed=3)
    gr = out["gap_recovery"]
    assert gr["FULL"]["value"] == pytest.approx(1) and gr["RECENCY"]["value"] == pytest.approx(0)
    assert gr["MC"]["value"] == pytest.approx(0.5) and gr["MC"]["lo"] == pytest.approx(0.5)  # paired: exact
    # replicate statistics equal a manual computation with the same indices
    idx = resample_indices(D, 400, 3)
    nb = counts[idx].sum(1)
    noisy = half + rng.normal(0, 5, D)
    out = paired_bootstrap({"FULL": full, "RECENCY": rec, "MC": noisy}, counts, n_boot=400, seed=3)
    r = ((rec[idx].sum(1) - noisy[idx].sum(1)) / nb) / ((rec[idx].sum(1) - full[idx].sum(1)) / nb)
    assert out["gap_recovery"]["MC"]["lo"] == pytest.approx(np.quantile(r, 0.025))
    assert out["gap_recovery"]["MC"]["hi"] == pytest.approx(np.quantile(r, 0.975))
    assert out["delta_vs_recency"]["FULL"]["value"] < 0
    # no gap: R undefined, never a number
    same = paired_bootstrap({"FULL": full, "RECENCY": full, "MC": half}, counts, 100, 0)["gap_recovery"]["MC"]
    assert same["value"] is None and same["undefined_frac"] == 1.0
    assert gap_recovery(2.0, 1.5, 1.0) == 0.5 and gap_recovery(1.0, 1.0, 1.0) is None


# ------------------------------------------------------------------ the evaluator
def _tiny_gpt(seq_len=128, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # make the blocks mix context (init zeroes the output projections)
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 0.1)
    return model.eval()


def _setup(model, W, gist="transformer", **kw):
    torch.manual_seed(1)
    learned = GistNet(64, 32, gistnet_type=gist, layers=1, n_head=2)
    if gist == "transformer":
        with torch.no_grad():
            for p in learned.parameters():
                p.normal_(0, 0.2)
    mean = GistNet(64, 32, gistnet_type="mean")
    return mc_eval.Setup(model.eval(), learned.eval(), mean, W, W, 32, 2, "gaussian", 8, **kw)


def _random_items(n, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [EvalItem(torch.randint(0, 503, (T + 1,), generator=g).tolist(), "text") for _ in range(n)]


def test_full_plan_equals_a_direct_forward_and_conditions_differ():
    model = _tiny_gpt()
    setup = _setup(model, W=32)
    items = _random_items(3, 128)
    res, meta, _ = mc_eval.evaluate_batch(setup, items)
    entries = {c: [m["entries"][c] for m in meta] for c in meta[0]["entries"]}
    assert "MC-LensNet" not in entries and all(m["lens"] is None for m in meta)  # no LensNet in this setup
    ids = torch.tensor([it.ids for it in items])
    with torch.no_grad():
        direct = model(ids[:, :-1], targets=ids[:, 1:], loss_reduction="none")[:, -32:]
    for k in range(3):
        np.testing.assert_allclose(res[k]["FULL"][0], direct[k].numpy(), rtol=1e-5, atol=1e-5)
    assert entries["MC"] == [35] * 3 and entries["RECENCY"] == [32] * 3 and entries["FULL"] == [128] * 3
    nll = {c: np.mean([r[c][0].mean() for r in res]) for c in res[0]}
    assert len({round(float(v), 6) for v in nll.values()}) >= 4  # FULL, RECENCY, MEANPOOL, MC differ
    assert not np.allclose(res[0]["MC"][0], res[0]["SHUFFLED"][0])  # gists of another document
    assert not np.allclose(res[0]["MC"][0], res[0]["MEANPOOL"][0])
    np.testing.assert_allclose(res[0]["MC"][0], res[0]["ORACLE"][0])  # no needles, E = 0: ORACLE is MC
    np.testing.assert_allclose(res[0]["MC"][0], res[0]["MC-fixed"][0])  # E = 0: MC-fixed is MC


def test_full_equals_recency_when_the_document_fits_the_window():
    model = _tiny_gpt()
    setup = _setup(model, W=64)
    items = _random_items(2, 64, seed=4) + _random_items(1, 40, seed=5)  # T <= W, two lengths in one batch
    res, _, _ = mc_eval.evaluate_batch(setup, items)
    for r in res:
        for c in ("RECENCY", "RECENCY-EQ", "RECENCY-EQ-FOCUS", "MEANPOOL", "MC", "MC-fixed", "MC-KEYMATCH", "ORACLE"):
            np.testing.assert_allclose(r[c][0], r["FULL"][0], rtol=1e-5, atol=1e-6)
            assert (r[c][1] == r["FULL"][1]).all()


def test_diagnostic_variants_and_mean_gistnet_identity():
    model = _tiny_gpt()
    items = _random_items(2, 128, seed=7)
    d = mc_eval.diagnose_batch(_setup(model, W=32), items)
    assert set(d) == {0, 1} and len({round(v, 6) for v in d[0].values()}) == 4
    d_mean = mc_eval.diagnose_batch(_setup(model, W=32, gist="mean"), items)
    assert d_mean[0]["gist"] == pytest.approx(d_mean[0]["meanpool"])


# ------------------------------------------------------------------ end to end
@pytest.fixture
def base_dir(tmp_path, tok, monkeypatch):
    base = tmp_path / "base"
    tok.save(str(base / "tokenizer"))
    cfg = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    save_checkpoint(str(base / "base_checkpoints" / "tiny"), 7, model.state_dict(), None, {"model_config": vars(cfg)})
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return base


def test_end_to_end_untrained_model_is_not_valid(base_dir, tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    ctx = "The passkey for the red door is 7351. " + "Nothing happened for a while. " * 40
    tasks.write_text(json.dumps({"context": ctx, "question": "What is the passkey for the red door?",
                                 "answer": "7351"}) + "\n")
    out = tmp_path / "mc.json"
    result = mc_eval.main(["--device_type=cpu", "--num_docs=4", "--num_probes=4", "--n_boot=100", "--batch_size=3",
                           "--num_assoc=1", "--assoc_pairs=4", "--assoc_queries=2", f"--tasks={tasks}", f"--out={out}"])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["schema"] == "mc_eval/v2" and data["valid"] is False and data["validity_reasons"]
    assert data["settings"]["wc_length"] == 32 and data["settings"]["gists"] == "mean"
    assert data["settings"]["focus_budget"] == 4 * 31 and data["settings"]["probe_multipliers"] == [4, 16]
    assert data["checkpoint"]["step"] == 7 and data["checkpoint"]["mc"] is False
    # a vanilla checkpoint: MC-LensNet is reported as not available, with the reason
    assert "vanilla" in data["not_available"]["MC-LensNet"] and data["settings"]["lensnet"]["available"] is False
    assert "not available" in data["comparisons"]["MC-LensNet vs MC-fixed"]["all"]
    for name in ("horizon", "boundary"):
        assert set(data["nll"][name]["nll"]) == {"FULL", "RECENCY", "RECENCY-EQ", "RECENCY-EQ-FOCUS", "MEANPOOL", "MC",
                                                 "MC-fixed", "MC-KEYMATCH", "SHUFFLED", "ORACLE"}
    assert data["nll"]["horizon"]["n_tokens"] == 4 * 32
    assert data["nll"]["long_range"]["gap_recovery"] is None and data["nll"]["long_range"]["valid"] is False
    assert data["probes"]["4xW"]["n"] == 4 and data["probes"]["4xW"]["all"]["FULL"]["n_answers"] == 4
    assert "FULL" not in data["probes"]["16xW"]["all"] and data["probes"]["16xW"]["history_tokens"] == 512
    assert data["probes"]["16xW"]["straddling"]["MC"]["n_answers"] == 2  # half of the probes straddle
    assert data["tasks"]["MC"]["n_answers"] == 1 and data["gistnet_diagnostic"]["n_docs"] == 4
    assert data["assoc"]["n"] == 2 and data["assoc"]["all"]["ORACLE"]["n_answers"] == 2
    assert data["assoc"]["valid"] is False and set(data["assoc"]["by_query"]) == {"1", "2"}
    ent = data["mean_wc_entries"]
    # T = 128, W = 32: 3 LOD1 gists; E = 124 entries open all three (3 x 31 = 93 <= 124): MC-fixed reads all raw
    assert ent["MC"] == 35 and ent["MC-fixed"] == 128 and ent["RECENCY"] == 32 and ent["FULL"] == 128
    assert ent["RECENCY-EQ"] == ent["MC"] and ent["RECENCY-EQ-FOCUS"] == ent["MC-fixed"] == ent["MC-KEYMATCH"]
    for block in (data["probes"]["4xW"], data["probes"]["16xW"], data["assoc"]):  # entries of every condition run
        assert set(block["mean_wc_entries"]) == set(block["all"]) and block["covered_by_validity"] is False
    assert set(data["tasks_mean_wc_entries"]) == set(data["tasks"]) and data["tasks_valid"] is False
    for name in ("horizon", "boundary"):  # R against both recencies (None: an untrained model has no gap)
        assert {"gap_recovery", "gap_recovery_eq", "gap_recovery_eq_focus"} <= set(data["nll"][name])
        assert data["nll"][name]["covered_by_validity"] is False
    assert not any(data["covered_by_validity"].values())
    assert data["plot"]["path"] == str(tmp_path / "mc.png") and (tmp_path / "mc.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "NOT VALID" in printed and "| metric | FULL | RECENCY |" in printed
    assert "MC-LensNet: not available: the checkpoint has no MegaContext modules" in printed
    report = (base_dir / "report" / "mc-evaluation.md").read_text()
    assert "NOT VALID" in report and "- valid: False" in report
    assert f"![mc_eval: exact match vs history length, R per window]({tmp_path / 'mc.png'})" in report  # embedded


def test_bad_flags_stop_with_a_clear_error(base_dir, capsys):
    for flags, msg in ((["--mc_eval_wc_length=40"], "multiple of the block size"), (["--horizon=64"], "--horizon"),
                       (["--doc_tokens=100"], "--doc_tokens"), (["--gists=learned"], "no GistNet"),
                       (["--probe_multipliers=x"], "--probe_multipliers"), (["--focus_budget=-1"], "--focus_budget"),
                       (["--assoc_multiplier=1"], "--assoc_multiplier"), (["--assoc_queries=9"], "--assoc_queries")):
        with pytest.raises(SystemExit):
            mc_eval.main(["--device_type=cpu", "--num_docs=1", "--num_probes=0", *flags])
        assert msg in capsys.readouterr().err


def test_data_dir_text_has_no_long_range_set(base_dir, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    gen = synthetic_texts("test")
    for i in range(3):
        (texts / f"doc{i}.txt").write_text(next(gen))
    out = tmp_path / "dir.json"
    data = mc_eval.main(["--device_type=cpu", f"--data_dir={texts}", "--num_docs=2", "--num_probes=0", "--n_boot=50",
                         "--diagnostic=0", "--num_assoc=0", f"--out={out}"])
    assert data["settings"]["data"].startswith("dir:") and data["nll"]["horizon"]["n_docs"] == 1  # val = doc 0 only
    assert data["nll"]["long_range"]["n_tokens"] == 0 and data["valid"] is False
    assert any("no long-range answer tokens" in r for r in data["validity_reasons"])
    assert data["gistnet_diagnostic"] is None


def test_mc_checkpoint_uses_its_learned_gistnet(base_dir, tmp_path):
    """An MC checkpoint (meta mc_config + "mc.gistnet.*" weights; build_model sets model.mc_modules)
    is evaluated with its own GistNet and its own positional type."""
    import dataclasses

    from mc.config import MCConfig
    from mc.modules import MCModules, mc_state_dict

    model = _tiny_gpt()
    cfg = MCConfig(gistnet_layers=1, positional_type="simple")
    modules = MCModules.from_config(cfg, 64)
    with torch.no_grad():
        for p in modules.parameters():
            p.normal_(0, 0.2)
    save_checkpoint(str(base_dir / "base_checkpoints" / "mc"), 3, {**model.state_dict(), **mc_state_dict(modules)},
                    None, {"model_config": vars(model.config), "mc_config": dataclasses.asdict(cfg)})
    data = mc_eval.main(["--device_type=cpu", "--model_tag=mc", "--num_docs=3", "--num_probes=2", "--n_boot=50",
                         "--num_assoc=1", "--assoc_pairs=4", "--assoc_queries=2", f"--out={tmp_path / 'mc.json'}"])
    assert data["settings"]["gists"] == "learned" and data["checkpoint"]["mc"] is True
    assert data["settings"]["positional_type"] == "simple"
    # the checkpoint's LensNet runs: every block has MC-LensNet results, refocus stats and entries
    lens = data["settings"]["lensnet"]
    assert lens["available"] and lens["allocator"]["allocator_iterations"] == 2 and not data["not_available"]
    assert "MC-LensNet" in data["nll"]["horizon"]["gap_recovery"] and data["lensnet_focus"]["n"] == 3
    for block in (data["probes"]["4xW"], data["probes"]["16xW"], data["assoc"]):
        assert "MC-LensNet" in block["all"] and block["lensnet_focus"]["n"] >= 2
        ent = block["mean_wc_entries"]
        # the same cap; MC-fixed spends all of it (or opens every gist when the history is short)
        assert ent["MC-LensNet"] <= ent["MC-fixed"] == min(ent["MC"] + 4 * 31, block["history_tokens"])
    assert set(data["comparisons"]) == {"MC-LensNet vs MC-fixed", "MC-LensNet vs MEANPOOL", "MC-LensNet vs MC-KEYMATCH",
                                        "MC-KEYMATCH vs MC-fixed"}
    assert set(data["comparisons"]["MC-LensNet vs MC-fixed"]) >= {"R horizon", "probe EM 4xW", "probe EM 16xW", "assoc EM"}
    h = data["nll"]["horizon"]["nll"]
    assert h["MC"]["value"] != h["MEANPOOL"]["value"] and h["MC"]["value"] != h["SHUFFLED"]["value"]
    d = data["gistnet_diagnostic"]["nll"]
    assert d["gist"]["value"] != d["meanpool"]["value"]
    with pytest.raises(SystemExit):  # its GistNet was trained on 32-token blocks
        mc_eval.main(["--device_type=cpu", "--model_tag=mc", "--num_docs=1", "--num_probes=0", "--mc_block_size=16"])
    # trained with --lensnet_type=none: MC-LensNet is "not available: <reason>", never silently dropped
    cfg_none = MCConfig(gistnet_layers=1, lensnet_type="none")
    save_checkpoint(str(base_dir / "base_checkpoints" / "fixed"), 3,
                    {**model.state_dict(), **mc_state_dict(MCModules.from_config(cfg_none, 64))}, None,
                    {"model_config": vars(model.config), "mc_config": dataclasses.asdict(cfg_none)})
    data = mc_eval.main(["--device_type=cpu", "--model_tag=fixed", "--num_docs=2", "--num_probes=0", "--n_boot=20",
                         "--num_assoc=0", "--diagnostic=0", f"--out={tmp_path / 'fixed.json'}"])
    assert "--lensnet_type=none" in data["not_available"]["MC-LensNet"]
    assert "MC-LensNet" not in data["nll"]["horizon"]["nll"] and "MC-fixed" in data["nll"]["horizon"]["nll"]


def test_summarize_valid_and_invalid_paths():
    from mc.eval.report import summarize

    rng = np.random.default_rng(0)
    nll = {"FULL": 1.0, "RECENCY": 2.0, "MEANPOOL": 1.9, "MC": 1.5, "MC-fixed": 1.45, "MC-LensNet": 1.2,
           "SHUFFLED": 2.1, "ORACLE": 1.1}
    meta = {"entries": {c: 40 for c in nll}, "lens": {"expands": 1, "collapses": 0, "changed": True,
                                                      "score_abs_mean": 0.5, "score_max": 0.9}}

    def docs(gap_scale):
        sets, recalls = [], []
        for _ in range(12):
            n = int(rng.integers(10, 30))
            noise = rng.normal(0, 0.01)
            per = {c: ((1.0 + (v - 1.0) * gap_scale + noise) * n, n) for c, v in nll.items()}
            sets.append({"horizon": per, "boundary": per, "long_range": per})
            recalls.append({c: [c in ("FULL", "ORACLE")] * 2 for c in nll})
        return {"sets": sets, "recalls": recalls, "meta": [meta] * 12,
                "diagnostic": [{"raw": 1.0, "gist": 1.1, "meanpool": 1.2, "dropped": 1.3}] * 12}

    probe = EvalItem([0] * 129, "probe", info={"fact": "passkey", "straddle": False})
    probes = {4: [(probe, {c: [c == "FULL"] for c in nll}, meta)] * 10}
    settings = {"gists": "learned", "boundary_tokens": 64}
    result, md, summary = summarize(settings, docs(1.0), probes, [], 200, 0)
    assert result["valid"] and not result["validity_reasons"] and result["probes"]["4xW"]["valid"]
    r = result["nll"]["long_range"]["gap_recovery"]["MC"]
    assert r["value"] == pytest.approx(0.5, abs=0.02) and r["lo"] <= 0.5 <= r["hi"]
    assert "NOT VALID" not in md and "valid (FULL shows the skill" in md and summary["gap recovery"] == r["value"]
    # tight CIs: MC-LensNet (R 0.8) vs MC-fixed (0.55) and MEANPOOL (0.1) do not overlap
    assert result["comparisons"]["MC-LensNet vs MC-fixed"]["R long_range"] == "no overlap"
    assert "MC-LensNet vs MEANPOOL: R horizon: CIs do not overlap" in md
    assert result["mean_wc_entries"]["MC-LensNet"] == 40 and result["lensnet_focus"]["frac_changed"] == 1.0
    # FULL cannot recall in the probes, and no gap to recover: not valid, no R number anywhere for long range
    probes_bad = {4: [(probe, {c: [False] for c in nll}, meta)] * 10}
    result, md, summary = summarize(settings, docs(0.01), probes_bad, [], 200, 0)
    assert not result["valid"] and len(result["validity_reasons"]) == 2
    assert result["nll"]["long_range"]["gap_recovery"] is None
    assert "gap_recovery_unvalidated" in result["nll"]["long_range"]
    row = next(line for line in md.splitlines() if line.startswith("| R long-range"))
    assert row.count("NOT VALID") == 6  # every condition but the two references
    assert "**Long-range result NOT VALID**" in md and "Probes @4xW: NOT VALID" in md
    assert summary["gap recovery"] == "NOT VALID" and not result["probes"]["4xW"]["valid"]
    assert result["comparisons"]["MC-LensNet vs MC-fixed"]["R long_range"] == "NOT VALID"
    # a LensNet that edits nothing anywhere is called out (MC-LensNet then equals MC)
    meta["lens"] = {**meta["lens"], "changed": False, "expands": 0}
    _, md, _ = summarize(settings, docs(1.0), probes, [], 50, 0)
    assert "MC-LensNet made no edit in any item" in md
