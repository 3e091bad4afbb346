"""GistNet: pad content never matters (seed 004 B), masked mean, init = mean, every config trains."""

import itertools

import pytest
import torch

from mc.gistnet import GistNet, masked_mean

C, S, H = 32, 8, 4
CONFIGS = [("transformer", p, h) for p, h in itertools.product(("mean", "query", "cls"), ("mlp", "linear"))]
CONFIGS.append(("mean", "mean", "mlp"))


def _net(kind, pooling, head, perturb=True, seed=0):
    torch.manual_seed(seed)
    net = GistNet(C, S, kind, layers=2, pooling=pooling, head=head, n_head=H)
    if perturb:  # move the zero/identity-initialised weights so every path does something
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return net


def _mask(N, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, S + 1, (N,), generator=g)
    return torch.arange(S)[None, :] < lens[:, None]


@pytest.mark.parametrize("kind, pooling, head", CONFIGS)
def test_output_ignores_pad_content(kind, pooling, head):
    net = _net(kind, pooling, head)
    x = torch.randn(6, S, C)
    mask = _mask(6)
    y = x.clone()
    y[~mask] = 1e3 * torch.randn_like(y[~mask])  # garbage in the padding
    a, b = net(x, mask), net(y, mask)
    assert a.shape == (6, C)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the padding really was masked: unmasked, the garbage changes the output
    assert not torch.allclose(net(x), net(y), atol=1e-3)


@pytest.mark.parametrize("kind, pooling, head", CONFIGS)
def test_every_config_has_gradients(kind, pooling, head):
    net = _net(kind, pooling, head)
    x = torch.randn(5, S, C, requires_grad=True)
    out = net(x, _mask(5))
    (out ** 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if kind == "transformer":
        params = {id(p) for p in net.parameters()}
        groups = net.matrix_params() + net.vector_params()
        assert len(groups) == len(params) and {id(p) for p in groups} == params
        assert all(p.ndim == 2 for p in net.matrix_params())


@pytest.mark.parametrize("kind, pooling, head", CONFIGS)
def test_fresh_gistnet_outputs_the_mean(kind, pooling, head):
    net = _net(kind, pooling, head, perturb=False)
    x = torch.randn(7, S, C)
    mask = _mask(7)
    torch.testing.assert_close(net(x, mask), masked_mean(x, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(x), x.mean(1), rtol=1e-5, atol=1e-5)


def test_masked_mean_matches_manual():
    net = GistNet(C, S, "mean")
    assert sum(p.numel() for p in net.parameters()) == 0
    x = torch.randn(4, S, C)
    mask = _mask(4)
    want = torch.stack([x[i, mask[i]].mean(0) for i in range(4)])
    torch.testing.assert_close(net(x, mask), want)


@pytest.mark.parametrize("kind, pooling, head", CONFIGS)
def test_rows_without_real_tokens_are_zero_not_nan(kind, pooling, head):
    net = _net(kind, pooling, head)
    x = torch.randn(3, S, C)
    mask = _mask(3)
    mask[1] = False
    out = net(x, mask)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0


def test_block_order_matters_for_transformer():
    net = _net("transformer", "query", "mlp")
    x = torch.randn(2, S, C)
    assert not torch.allclose(net(x), net(x.flip(1)), atol=1e-4)  # rotary gives in-block order


def test_bad_arguments():
    with pytest.raises(ValueError, match="--gistnet_pooling"):
        GistNet(C, S, pooling="max")
    with pytest.raises(ValueError, match="--gistnet_type"):
        GistNet(C, S, gistnet_type="rnn")
    with pytest.raises(ValueError, match="--gistnet_head"):
        GistNet(C, S, head="conv")
    with pytest.raises(ValueError, match="n_head"):
        GistNet(30, S, n_head=4)
    net = GistNet(C, S, n_head=H)
    with pytest.raises(ValueError, match="blocks"):
        net(torch.randn(2, S, C + 1))
    with pytest.raises(ValueError, match="key_padding_mask"):
        net(torch.randn(2, S, C), torch.ones(2, S))
