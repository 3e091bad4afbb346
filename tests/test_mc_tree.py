"""MegaContextTree: batched levels (one GistNet call per level), partial blocks, append == build,
the cache_lod0 policy (seed 004 C), gradients."""

import pytest
import torch

from mc.gistnet import GistNet
from mc.tree import MegaContextTree

C, BS = 16, 4


class Counting(torch.nn.Module):
    """Wraps a GistNet and records the number of blocks of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, blocks, key_padding_mask=None):
        self.calls.append(blocks.size(0))
        return self.net(blocks, key_padding_mask)


def _gistnet(seed=0):
    torch.manual_seed(seed)
    net = GistNet(C, BS, "transformer", layers=1, pooling="query", head="mlp", n_head=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return Counting(net)


def test_build_shapes_values_and_one_call_per_level():
    g = _gistnet()
    B, T = 3, 2 * BS**2 + 3 * BS + 2  # 2 LOD2 groups, 11 complete blocks, a partial block of 2
    E = torch.randn(B, T, C)
    tree = MegaContextTree.build(E, g, BS, max_lod=2)
    lod0, lod1, lod2 = tree.levels
    assert lod0.shape == (B, T, C) and lod1.shape == (B, 11, C) and lod2.shape == (B, 2, C)
    assert g.calls == [B * 11, B * 2]  # one batched call per level
    torch.testing.assert_close(lod1[1, 5], g.net(E[1:2, 5 * BS: 6 * BS])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lod2[2, 1], g.net(lod1[2:3, BS: 2 * BS])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tree.tail, E[:, 11 * BS:])
    assert tree.num_tokens == T
    assert tree.span_starts(1).tolist() == [j * BS for j in range(11)]
    assert tree.span_starts(2).tolist() == [0, BS**2]


def test_short_history_has_empty_gist_levels():
    tree = MegaContextTree.build(torch.randn(2, BS - 1, C), _gistnet(), BS, 2)
    assert tree.level(1).shape == (2, 0, C) and tree.level(2).shape == (2, 0, C)
    assert tree.tail.shape == (2, BS - 1, C)


@pytest.mark.parametrize("cache_lod0", [True, False])
def test_append_in_chunks_equals_build(cache_lod0):
    g = _gistnet()
    T = 3 * BS**2 + 5
    E = torch.randn(1, T, C)
    with torch.no_grad():
        ref = MegaContextTree.build(E, g, BS, 2)
        g.calls.clear()
        tree = MegaContextTree(g, BS, 2, cache_lod0=cache_lod0)
        gen = torch.Generator().manual_seed(0)
        t, totals = 0, [0, 0, 0]
        while t < T:
            k = min(int(torch.randint(0, 9, (1,), generator=gen)), T - t)
            new = tree.append(E[:, t: t + k])
            totals = [a + b for a, b in zip(totals, new)]
            t += k
    assert totals == [T, T // BS, T // BS**2]
    assert sum(g.calls) == T // BS + T // BS**2  # every gist computed exactly once, old ones never again
    for level in (1, 2):
        torch.testing.assert_close(tree.level(level), ref.level(level), rtol=1e-5, atol=1e-5)
    if cache_lod0:
        torch.testing.assert_close(tree.level(0), E)
    else:
        assert tree.levels[0] is None
        with pytest.raises(ValueError, match="mc_cache_lod0"):
            tree.level(0)
    torch.testing.assert_close(tree.tail, E[:, T - T % BS:])


def test_cache_lod0_false_drops_lod0_after_build_and_append():
    E = torch.randn(2, 2 * BS + 1, C)
    tree = MegaContextTree.build(E, _gistnet(), BS, 2, cache_lod0=False)
    assert tree.levels[0] is None and tree._buf[0] is None
    assert tree.tail.shape == (2, 1, C) and tree.tail.data_ptr() != E.data_ptr()
    tree.append(torch.randn(2, 3 * BS, C))
    assert tree._buf[0] is None and tree.tail.size(1) == 1 and tree.level(1).size(1) == 5


def test_gradients_reach_lod0_through_every_level():
    g = _gistnet()
    E = torch.randn(2, BS**2 + BS, C, requires_grad=True)
    tree = MegaContextTree.build(E, g, BS, 2)
    tree.level(2).sum().backward()
    assert E.grad[:, : BS**2].abs().sum() > 0
    assert E.grad[:, BS**2:].abs().sum() == 0  # the last block is not under any LOD2 gist
    assert all(p.grad is not None for p in g.parameters())


def test_append_with_grad_keeps_the_graph():
    g = _gistnet()
    E = torch.randn(1, 2 * BS + 2, C, requires_grad=True)
    tree = MegaContextTree(g, BS, 1)
    tree.append(E[:, :3])
    tree.append(E[:, 3:])
    tree.level(1)[:, 1].sum().backward()  # the block made of rows 4..7, completed by the second append
    assert E.grad[:, BS: 2 * BS].abs().sum() > 0 and E.grad[:, :BS].abs().sum() == 0


def test_bad_input():
    tree = MegaContextTree(_gistnet(), BS, 2)
    with pytest.raises(ValueError, match="empty"):
        tree.level(1)
    tree.append(torch.randn(2, 5, C))
    with pytest.raises(ValueError, match="2 histories"):
        tree.append(torch.randn(3, 5, C))
    with pytest.raises(ValueError, match=r"\[B, t, C\]"):
        tree.append(torch.randn(5, C))
    with pytest.raises(ValueError, match="mc_block_size"):
        MegaContextTree(None, 1, 2)


def test_grow_adds_a_level_equal_to_a_taller_build():
    """grow() on a max_lod-1 tree, then more appends, gives the same levels as a tree built with max_lod 2
    from the start (the new level is the same GistNet over groups of block_size gists)."""
    torch.manual_seed(0)
    g = GistNet(16, block_size=4, gistnet_type="transformer", layers=1).eval()
    x = torch.randn(2, 150, 16)
    with torch.no_grad():
        tall = MegaContextTree.build(x, g, block_size=4, max_lod=2)
        grown = MegaContextTree.build(x[:, :70], g, block_size=4, max_lod=1)
        assert grown.grow() == 70 // 16 and grown.max_lod == 2
        grown.append(x[:, 70:])
    for level in (1, 2):
        torch.testing.assert_close(grown.level(level), tall.level(level))
