"""What a refocus moved (mc/infer/session_metrics.py), on hand-made entry lists: the KV slots kept, the re-prefill,
the swap rate and the residency."""

import torch

from mc.infer.session_metrics import add_refocus, refocus_moves


def test_an_expand_in_the_middle_keeps_the_slots_before_it():
    bs = 4
    # old: [LOD1 0-3] [LOD1 4-7] [raw 8] [raw 9]; new: the second gist expanded to raw 4..7
    old_start, old_lod = torch.tensor([0, 4, 8, 9]), torch.tensor([1, 1, 0, 0])
    start, lod = torch.tensor([0, 4, 5, 6, 7, 8, 9]), torch.tensor([1, 0, 0, 0, 0, 0, 0])
    m = refocus_moves(old_start, old_lod, start, lod, cached=4, T=10, block_size=bs, max_lod=1)
    assert m["first_changed_entry"] == 1 and m["kept"] == 1
    assert m["reprefill_entries"] == 6  # every new entry before token 10 (the cache's end), less the one kept
    assert abs(m["swap_rate"] - 4 / 7) < 1e-6 and m["residency"] == 3 / 4


def test_nothing_changed_keeps_the_cache_and_a_short_cache_limits_what_is_kept():
    start, lod = torch.tensor([0, 4, 8]), torch.tensor([1, 1, 0])
    same = refocus_moves(start, lod, start, lod, cached=3, T=9, block_size=4, max_lod=1)
    assert same == dict(first_changed_entry=3, kept=3, reprefill_entries=0, swap_rate=0.0, residency=1.0)
    assert refocus_moves(start, lod, start, lod, cached=1, T=9, block_size=4, max_lod=1)["kept"] == 1
    totals = dict(refocuses=0, expands=0, collapses=0, forced=0, reprefill_entries=0, refocus_ms=0.0,
                  swap_rate_sum=0.0)
    add_refocus(totals, dict(expands=2, collapses=1, forced=0, reprefill_entries=5, refocus_ms=3.0, swap_rate=0.5))
    assert totals == dict(refocuses=1, expands=2, collapses=1, forced=0, reprefill_entries=5, refocus_ms=3.0,
                          swap_rate_sum=0.5)
