"""Tests for nanochat/muon.py and nanochat/adamw.py: Newton-Schulz orthogonalization, Muon steps, and
the distributed variants on 2 gloo processes matching one process on averaged gradients."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.adamw import DistAdamW
from nanochat.muon import DistMuon, Muon, zeropower_via_newtonschulz5

WORLD = 2
STEPS = 3
SHAPES = [(16, 8), (8, 16), (12, 12), (24, 8), (8, 24)]  # 5 matrices: uneven round-robin over 2 ranks


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (96, 96 // 4)])
def test_newton_schulz_orthogonalizes(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape) * 3.0
    X = zeropower_via_newtonschulz5(G)
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's band around 1, not exactly 1
    # same singular vectors as G: X ~ U diag(s') V^T
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.allclose(U.T @ X @ Vh.T, torch.diag(torch.diag(U.T @ X @ Vh.T)), atol=0.05)


def test_muon_step_and_shape_scale():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 8))
    before = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False)
    p.grad = torch.randn(32, 8)
    opt.step()
    update = (before - p.detach()) / 0.1
    s = torch.linalg.svdvals(update / (32 / 8) ** 0.5)
    assert s.min() > 0.5 and s.max() < 1.3
    with pytest.raises(ValueError, match="2D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


# ---------------------------------------------------------------------------- distributed
def make_params():
    torch.manual_seed(123)
    return [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]


def grad_for(step, rank, i, shape):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + i)
    return torch.randn(*shape, generator=g)


def run_steps(opt, params, rank=None):
    """rank=None: one process with the average of both ranks' grads; else this rank's own grads."""
    for step in range(STEPS):
        for i, p in enumerate(params):
            if rank is None:
                p.grad = sum(grad_for(step, r, i, p.shape) for r in range(WORLD)) / WORLD
            else:
                p.grad = grad_for(step, rank, i, p.shape)
        opt.step()
    return [p.detach().clone() for p in params]


def worker(rank, store_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        results = {}
        params = make_params()
        results["muon"] = run_steps(DistMuon(params, lr=0.05), params, rank)
        params = make_params()
        results["adamw"] = run_steps(DistAdamW(params, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1), params, rank)
        # missing grads: param 0 has none on any rank (skipped), param 1 only on rank 0 (rank 1 adds zeros)
        params = make_params()
        opt = DistAdamW(params, lr=0.01)
        for i, p in enumerate(params[1:], start=1):
            p.grad = None if (i == 1 and rank == 1) else grad_for(0, rank, i, p.shape)
        opt.step()
        results["partial"] = [p.detach().clone() for p in params]
        # GPT.setup_optimizers picks the distributed variants under torch.distributed
        from nanochat.gpt import GPT, GPTConfig
        model = GPT(GPTConfig(sequence_len=8, vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
        results["types"] = [type(o).__name__ for o in model.setup_optimizers()]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_dist_muon_matches_single_process(dist_results):
    params = make_params()
    ref = run_steps(Muon(params, lr=0.05), params)
    assert not torch.allclose(ref[0], make_params()[0])
    for res in dist_results:
        for got, want in zip(res["muon"], ref):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_dist_adamw_matches_single_process(dist_results):
    params = make_params()
    ref = run_steps(torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1), params)
    for res in dist_results:
        for got, want in zip(res["adamw"], ref):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_dist_adamw_missing_grads(dist_results):
    params = make_params()
    opt = torch.optim.AdamW(params, lr=0.01)
    for i, p in enumerate(params[1:], start=1):
        g0, g1 = grad_for(0, 0, i, p.shape), grad_for(0, 1, i, p.shape)
        p.grad = g0 / WORLD if i == 1 else (g0 + g1) / WORLD
    opt.step()
    for res in dist_results:
        torch.testing.assert_close(res["partial"][0], make_params()[0], rtol=0, atol=0)  # untouched
        for got, want in zip(res["partial"], params):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_setup_optimizers_picks_distributed_variants(dist_results):
    for res in dist_results:
        assert res["types"] == ["DistAdamW", "DistMuon"]
