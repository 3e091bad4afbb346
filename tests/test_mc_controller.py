"""
MCController.process_batch with the real GPT (tiny, CPU): exact targets, one packed forward, per-row
positions, padding that cannot leak, gradients into GistNet and the GPT, the recency baseline equal to
a plain last-W forward, metric names and values, dtype casting, no host syncs, clear phase errors,
split-independent variant sampling; plus the pure helpers it wires (hashed_uniform, padded_length,
MetricMeter, PhaseTimer, MCModules, PositionalCaches).
"""

import pytest
import torch

import mc.train.controller as controller_module
from mc.config import MCConfig
from mc.modules import MCModules, attach, mc_state_dict, split_mc_state
from mc.train.controller import MCController, MCControllerError, padded_length
from mc.train.timing import MetricMeter, PhaseTimer
from mc.train.variants import hashed_uniform
from nanochat.gpt import GPT, GPTConfig

V_SIZE, T, C = 97, 160, 32
SEED_METRICS = ["mc/lod_loss/0", "mc/lod_loss/1", "mc/lod_loss/2", "mc/lod_delta/1", "mc/adv_delta_mean",
                "mc/adv_delta_p95", "mc/adv_delta_std", "train/loss_lod0", "mc/variants_total",
                "mc/effective_batch_size", "mc/variants_per_sample", "mc/token_loss", "mc/wc_length"]
SEED_TIMINGS = ["mc/time_build_ms", "mc/time_variant_ms", "mc/time_base_forward_ms", "mc/time_controller_ms"]


def perturb(module, scale=0.05, seed=1):
    """Random small weights everywhere (fresh models zero their output projections, which would hide
    context effects and leave some gradients zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def make(num_variants=2, W=56, recent=8, block=4, gist_delta_weight=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=T, vocab_size=V_SIZE, n_layer=2, n_head=2, n_kv_head=2, n_embd=C))
    model.init_weights()
    cfg = MCConfig(block_size=block, train_wc_length=W, recent_tokens=recent, num_random_variants=num_variants,
                   gist_delta_weight=gist_delta_weight, wc_anneal_start_frac=0.5, gistnet_layers=1, **kw)
    mods = MCModules.from_config(cfg, C)
    perturb(model)
    perturb(mods, seed=2)
    return model, mods, cfg


def batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, V_SIZE, (B, T + 1), generator=g)
    return full[:, :-1], full[:, 1:]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup():
    model, mods, cfg = make()
    ctl = MCController(model, mods, cfg, total_steps=100)
    x, y = batch()
    result = ctl.process_batch(x, y, step=100)  # end of the anneal: W = 56
    return model, mods, cfg, ctl, x, y, result


def test_targets_are_the_token_after_each_span(setup):
    model, mods, cfg, ctl, x, y, r = setup
    wc, targets = r.extras["wc"], r.extras["targets"]
    full = torch.cat([x, y[:, -1:]], 1)
    checked = {0: 0, 1: 0, 2: 0}
    for row in range(wc.valid.size(0)):
        b = int(wc.sample_idx[row])
        for j in range(wc.valid.size(1)):
            if not wc.valid[row, j]:
                assert targets[row, j] == -1
                continue
            s, n, lod = int(wc.span_start[row, j]), int(wc.span_len[row, j]), int(wc.lod[row, j])
            assert n == cfg.block_size ** lod
            assert targets[row, j] == full[b, s + n]  # gist of [s, s+n) predicts x[s+n]; raw t predicts y[t]
            if lod == 0:
                assert targets[row, j] == y[b, s]
            checked[lod] += 1
    assert all(v > 0 for v in checked.values()), checked  # raw tokens, LOD1 and LOD2 gists all checked


def test_one_packed_forward_for_all_variants(monkeypatch):
    model, mods, cfg = make(num_variants=3)
    calls = []
    real = GPT.forward

    def spy(self, *a, **kw):
        calls.append((kw.get("inputs_embeds"), kw.get("cos_sin_override"), kw.get("key_padding_mask")))
        return real(self, *a, **kw)

    monkeypatch.setattr(GPT, "forward", spy)
    x, y = batch(B=4)
    MCController(model, mods, cfg, total_steps=10).process_batch(x, y, step=3)
    assert len(calls) == 2  # the full-sequence LM forward + ONE packed forward of every working context
    packed = [c for c in calls if c[0] is not None]
    assert len(packed) == 1
    emb, (cos, sin), mask = packed[0]
    assert emb.shape[0] == 4 * (1 + 3) and cos.shape[0] == 4 * 4 and mask.shape == emb.shape[:2]
    assert (~mask).any()  # rows differ in length: right-aligned padding exists


def test_positions_are_per_row_and_differ_across_samples(setup):
    model, mods, cfg, ctl, x, y, r = setup
    cos, sin = r.positional_caches.packed
    V = 1 + cfg.num_random_variants
    assert cos.shape[:2] == r.extras["wc"].valid.shape and cos.shape[2:] == (1, C // 2 // 2)
    assert not torch.allclose(cos[1], cos[V + 1])  # variant 1 of sample 0 vs of sample 1
    assert not torch.allclose(cos[1], cos[2])
    # the GPT's own table would give every row the same positions: the override really differs from it
    L = cos.size(1)
    assert not torch.allclose(cos[1], model.cos[0, :L])
    c0, s0, alibi = r.positional_caches["train_step_100_sample_1"]
    assert alibi is None and torch.equal(c0, cos[V:2 * V]) and torch.equal(s0, sin[V:2 * V])
    assert list(r.positional_caches) == [f"train_step_100_sample_{b}" for b in range(3)]


def _packed_nll(model, valid, targets, emb, cos, sin):
    return model(inputs_embeds=emb, targets=targets, cos_sin_override=(cos, sin), key_padding_mask=valid,
                 loss_reduction="none")


def test_padding_is_masked(setup):
    model, mods, cfg, ctl, x, y, r = setup
    wc, targets = r.extras["wc"], r.extras["targets"]
    cos, sin = r.positional_caches.packed
    with torch.no_grad():
        ref = _packed_nll(model, wc.valid, targets, wc.embeddings, cos, sin)
        garbage = torch.randn_like(wc.embeddings) * 50
        emb = torch.where(wc.valid[..., None], wc.embeddings, garbage)
        cos_g = torch.where(wc.valid[..., None, None], cos, torch.rand_like(cos))
        got = _packed_nll(model, wc.valid, targets, emb, cos_g, sin)
        assert torch.allclose(got[wc.valid], ref[wc.valid], atol=1e-5)
        # and each row alone, unpadded, gives the same per-entry losses as inside the packed batch
        for row in (0, 1, 4):
            n = int(wc.valid[row].sum())
            alone = _packed_nll(model, None, targets[row:row + 1, -n:], wc.embeddings[row:row + 1, -n:],
                                cos[row:row + 1, -n:], sin[row:row + 1, -n:])
            assert torch.allclose(alone[0], ref[row, -n:], atol=1e-5), row


def test_loss_reaches_gistnet_and_gpt():
    model, mods, cfg = make(gist_delta_weight=0.5)
    x, y = batch()
    r = MCController(model, mods, cfg, total_steps=10).process_batch(x, y, step=10)
    r.loss.backward()
    for name, p in list(mods.named_parameters()) + list(model.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_is_lm_plus_variants_plus_penalty():
    model, mods, cfg = make(gist_delta_weight=0.7)
    x, y = batch()
    r = MCController(model, mods, cfg, total_steps=10).process_batch(x, y, step=10)
    m = r.float_metrics()
    expected = m["mc/lm_loss"] + m["mc/token_loss"] + 0.7 * m["mc/gist_penalty"] + cfg.lens_loss_weight * m["mc/lens_loss"]
    assert r.loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["mc/total_loss"] == pytest.approx(expected, rel=1e-5)
    assert m["mc/lm_loss"] == pytest.approx(model(x, y).item(), rel=1e-5)
    d = r.horizon_nll[:, 1:] - r.horizon_nll[:, :1]
    assert m["mc/adv_delta_mean"] == pytest.approx(d.mean().item(), abs=1e-6)
    assert m["mc/gist_penalty"] == pytest.approx(d.clamp(min=0).mean().item(), abs=1e-6)


LENS_METRICS = ["mc/lens_loss", "mc/lens_pairs", "mc/preference_corr_mean", "mc/preference_corr_max",
                "mc/pref_span_corr", "mc/policy_score_abs_mean", "mc/policy_score_std_mean"]


def test_lens_loss_trains_lensnet_only():
    """The lens term reaches every LensNet weight and nothing else (LensNet reads detached embeddings):
    GPT and GistNet gradients are the same with --mc_lens_loss_weight 0 and 1."""
    x, y = batch()
    grads = {}
    for weight in (0.0, 1.0):
        model, mods, cfg = make(num_variants=4, lens_loss_weight=weight)
        r = MCController(model, mods, cfg, total_steps=10).process_batch(x, y, step=10)
        r.loss.backward()
        grads[weight] = {n: p.grad.clone() for n, p in list(model.named_parameters()) + list(mods.gistnet.named_parameters())}
        if weight:
            m = r.float_metrics()
            assert set(LENS_METRICS) <= set(m) and m["mc/lens_pairs"] > 0 and m["mc/lens_loss"] > 0
            assert {"mc/time_lens_forward_ms", "mc/time_lens_loss_ms"} <= set(r.timings)
            for name, p in mods.lensnet.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert all(p.grad is None or p.grad.abs().sum() == 0 for p in mods.lensnet.parameters())
    for name in grads[0.0]:
        assert torch.equal(grads[0.0][name], grads[1.0][name]), name


def test_without_lensnet_there_is_no_lens_term():
    model, mods, cfg = make(lensnet_type="none")
    assert mods.lensnet is None
    x, y = batch()
    r = MCController(model, mods, cfg, total_steps=10).process_batch(x, y, step=10)
    assert not set(LENS_METRICS) & set(r.metrics) and "mc/time_lens_forward_ms" not in r.timings


def test_lens_emas_commit_once_per_step_and_roundtrip():
    """Every micro-batch of a step reads the same EMA value, so splitting a step's rows differently
    gives the same lens losses; the state survives a checkpoint round trip."""
    model, mods, cfg = make(num_variants=4, lens_budget_smooth_weight=0.5)
    x, y = batch(B=4)
    ids = torch.arange(4)
    one = MCController(model, mods, cfg, total_steps=10)
    two = MCController(model, mods, cfg, total_steps=10)
    for step in range(3):
        whole = one.process_batch(x, y, step=step, row_ids=ids)
        one.commit_step()
        halves = [two.process_batch(x[s], y[s], step=step, row_ids=ids[s]) for s in (slice(0, 2), slice(2, 4))]
        two.commit_step()
        # the lens loss is a mean over the micro-batch's pairs: compare the pair-weighted pieces
        assert whole.metrics["mc/lens_pairs"] == sum(h.metrics["mc/lens_pairs"] for h in halves)
    for key in ("adv_scale", "budget_mean"):
        assert one.lens_state_dict()[key]["value"] == pytest.approx(two.lens_state_dict()[key]["value"], rel=1e-5)
    restored = MCController(model, mods, cfg, total_steps=10)
    restored.load_lens_state(one.lens_state_dict())
    a = one.process_batch(x, y, step=3, row_ids=ids).metrics["mc/lens_loss"]
    b = restored.process_batch(x, y, step=3, row_ids=ids).metrics["mc/lens_loss"]
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_recency_baseline_equals_plain_last_w_forward(setup):
    model, mods, cfg, ctl, x, y, r = setup
    W = ctl.wc_length(100, T)
    assert W == 56
    V = 1 + cfg.num_random_variants
    wc, targets = r.extras["wc"], r.extras["targets"]
    cos, sin = r.positional_caches.packed
    with torch.no_grad():
        nll = _packed_nll(model, wc.valid, targets, wc.embeddings, cos, sin)
        plain = model(x[:, T - W:], y[:, T - W:], loss_reduction="none")  # positions 0..W-1: RoPE is relative
    base = nll.view(3, V, -1)[:, 0, -W:]
    assert torch.allclose(base, plain, atol=2e-4)
    assert r.float_metrics()["train/loss_lod0"] == pytest.approx(plain.mean().item(), rel=1e-4)


def test_metric_names_and_values(setup):
    model, mods, cfg, ctl, x, y, r = setup
    m = r.float_metrics()
    for name in SEED_METRICS:
        assert name in m, name
    assert set(SEED_TIMINGS) <= set(r.timings) and all(v >= 0 for v in r.timings.values())
    assert m["mc/variants_total"] == 3 * 2 and m["mc/variants_per_sample"] == 3 and m["mc/effective_batch_size"] == 9
    assert m["mc/wc_length"] == 56
    wc, targets = r.extras["wc"], r.extras["targets"]
    cos, sin = r.positional_caches.packed
    with torch.no_grad():
        nll = _packed_nll(model, wc.valid, targets, wc.embeddings, cos, sin)
    at1 = wc.valid & (wc.lod == 1)
    assert m["mc/lod_loss/1"] == pytest.approx(nll[at1].mean().item(), rel=1e-4)
    assert m["mc/adv_delta_p95"] >= m["mc/adv_delta_mean"] - 3 * m["mc/adv_delta_std"] - 1e-6


def test_anneal_and_padded_length():
    model, mods, cfg = make()
    ctl = MCController(model, mods, cfg, total_steps=10)
    Ws = [ctl.wc_length(s, T) for s in range(12)]
    assert Ws[0] == 80 and Ws[-1] == 56 and Ws == sorted(Ws, reverse=True)
    assert padded_length(56, 160, 10) == 60 and padded_length(56, 58, 10) == 58 and padded_length(60, 160, 10) == 60


def test_no_host_sync_inside_process_batch(monkeypatch):
    model, mods, cfg = make()
    ctl = MCController(model, mods, cfg, total_steps=10)
    x, y = batch()
    ctl.process_batch(x, y, step=2)  # warm up lazy tables first

    def boom(*a, **k):
        raise AssertionError("host sync inside process_batch")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    r = ctl.process_batch(x, y, step=3)
    monkeypatch.undo()
    assert torch.isfinite(r.loss)


@pytest.mark.parametrize("model_dtype, aux", [(torch.bfloat16, "fp32"), (torch.float32, "bf16")])
def test_dtypes_are_cast_for_the_gpt(model_dtype, aux):
    model, mods, cfg = make(aux_dtype=aux)
    model.to(model_dtype)
    x, y = batch(B=2)
    r = MCController(model, mods, cfg, total_steps=10).process_batch(x, y, step=5)
    r.loss.backward()
    assert torch.isfinite(r.loss) and r.loss.dtype == torch.float32
    assert any(p.grad is not None for p in mods.parameters())


def test_errors_name_the_phase(monkeypatch):
    model, mods, cfg = make()

    def broken(*a, **k):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(controller_module, "sample_variants", broken)
    x, y = batch()
    with pytest.raises(MCControllerError, match="phase 'sample' at step 7: RuntimeError: sampler exploded"):
        MCController(model, mods, cfg, total_steps=10).process_batch(x, y, step=7)
    with pytest.raises(MCControllerError, match="phase 'tree'.*must both be"):
        MCController(model, mods, cfg).process_batch(x, y[:, :-1], step=0)


def test_variants_depend_on_row_ids_not_on_the_split():
    model, mods, cfg = make()
    ctl = MCController(model, mods, cfg, total_steps=10, seed=5)
    x, y = batch(B=4)
    ids = torch.tensor([40, 41, 42, 43])
    whole = ctl.process_batch(x, y, step=4, row_ids=ids)
    a = ctl.process_batch(x[:2], y[:2], step=4, row_ids=ids[:2])
    b = ctl.process_batch(x[2:], y[2:], step=4, row_ids=ids[2:])
    assert torch.equal(whole.plans, torch.cat([a.plans, b.plans]))
    assert torch.allclose(whole.horizon_nll, torch.cat([a.horizon_nll, b.horizon_nll]), atol=1e-5)
    other = ctl.process_batch(x, y, step=5, row_ids=ids)
    assert not torch.equal(whole.plans, other.plans)


def test_memory_log_is_written(tmp_path):
    model, mods, cfg = make()
    path = tmp_path / "mc_memory_step1.txt"
    x, y = batch()
    MCController(model, mods, cfg).process_batch(x, y, step=0, memory_log=str(path))
    text = path.read_text()
    for phase in ("tree", "sample", "base_forward", "variant"):
        assert f"after phase '{phase}'" in text
    assert "rss" in text


def test_hashed_uniform():
    u = hashed_uniform(torch.arange(100), step=3, seed=0, num_variants=4, num_units=50)
    assert u.shape == (400, 50) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 12 ** -0.5) < 0.01
    assert torch.equal(u, hashed_uniform(torch.arange(100), 3, 0, 4, 50))
    assert torch.equal(u[8:12], hashed_uniform(torch.tensor([2]), 3, 0, 4, 50))  # row 2 alone: same keys
    assert not torch.equal(u, hashed_uniform(torch.arange(100), 4, 0, 4, 50))
    assert not torch.equal(u, hashed_uniform(torch.arange(100), 3, 1, 4, 50))
    assert (u[:, None, :] == u[None, :, :]).all(-1).sum() == 400  # no two rows alike


def test_meter_and_timer():
    meter = MetricMeter()
    meter.add({"a": torch.tensor(1.0), "b": torch.tensor(float("nan")), "c": 3})
    meter.add({"a": torch.tensor(3.0), "b": torch.tensor(4.0), "c": 5})
    timer = PhaseTimer("cpu")
    with timer("x"):
        sum(range(1000))
    meter.add_timer(timer, prefix="mc/time_")
    out = meter.means()
    assert out["a"] == 2.0 and out["b"] == 4.0 and out["c"] == 4.0 and out["mc/time_x_ms"] >= 0


def test_modules_state_roundtrip_and_attach():
    model, mods, cfg = make()
    state = {**model.state_dict(), **mc_state_dict(mods)}
    gpt_state, mc_state = split_mc_state(state)
    assert set(gpt_state) == set(model.state_dict()) and all(k.startswith(("gistnet.", "lensnet.")) for k in mc_state)
    assert any(k.startswith("lensnet.") for k in mc_state)
    fresh = MCModules.from_config(cfg, C)
    fresh.load_state_dict(mc_state)
    attach(model, fresh, cfg)
    assert model.mc_modules is fresh and model.mc_config is cfg
    assert set(model.state_dict()) == set(gpt_state)  # not registered as a submodule
    n_opt = sum(len(g["params"]) for o in model.setup_optimizers(extra_matrix_params=fresh.matrix_params(),
                                                                   extra_adam_params=fresh.adam_params())
                for g in o.param_groups)
    assert n_opt == len(list(model.parameters())) + len(list(fresh.parameters()))



def test_lensnet_proposed_variants_follow_its_scores_without_host_syncs(monkeypatch):
    """--mc_priority_variants: the first variant of each sample is LensNet's proposal. A LensNet that rates the
    oldest entries highest gets them expanded in its proposals far more often than in the random variants."""
    model, mods, cfg = make(num_variants=2, priority_variants=1, priority_temperature=0.1, lensnet_type="transformer")
    ctl = MCController(model, mods, cfg, total_steps=10)

    def oldest_first(wc, **kw):
        return torch.where(wc.valid, 1.0 - 2.0 * wc.span_start.float() / T, 0.0)

    monkeypatch.setattr(ctl.lensnet, "forward", oldest_first)
    x, y = batch(B=8)
    ctl.process_batch(x, y, step=2)  # warm up lazy tables first

    def boom(*a, **k):
        raise AssertionError("host sync inside process_batch")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
            m.setattr(torch.Tensor, name, boom)
        r = ctl.process_batch(x, y, step=3)
    assert torch.isfinite(r.loss) and r.float_metrics()["mc/priority_variants"] == 1
    wc = r.extras["wc"]
    assert int(wc.valid.sum(1).max()) <= ctl.wc_length(3, T)  # the proposals spend the same budget W
    again = ctl.process_batch(x, y, step=3).extras["wc"]
    assert torch.equal(again.span_start, wc.span_start) and torch.equal(again.lod, wc.lod)  # deterministic
    old_detail = ((wc.lod == 0) & wc.valid & (wc.span_start < T // 2)).sum(1).view(8, 3).float()
    assert old_detail[:, 1].mean() > 1.5 * old_detail[:, 2].mean()  # proposal (1) vs random variant (2)
