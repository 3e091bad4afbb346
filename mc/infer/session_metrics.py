"""
What an inference session (mc/infer/session.py) measures: what a refocus moved, the counters since the start,
and the telemetry events.

    moved = refocus_moves(old_start, old_lod, start, lod, cached, T, bs, max_lod)   # one refocus
    add_refocus(session.totals, last)                                                # into the counters
    session_stats(session); emit_refocus_events(session, last)                       # stats(), telemetry

Why the kept slots are exact: every entry whose span starts before t* (the first token whose level changed) is
identical in both entry lists (a legal plan cannot change inside an aligned span it keeps), so the first
min(k, cached) cache slots stay valid; the session truncates the cache there (KVCache.set_pos), and every entry
after it is re-run, unchanged ones too (causal attention: an unchanged entry after the first changed one sat
behind different keys and at another cache slot).

Per refocus (entries are identified by (span_start, lod)):
    first_changed_entry  k = #{new entries starting before t*}, t* = the first token whose level changed
                         (mc.entry_allocator.first_changed_start): every entry before it is unchanged
    kept                 min(k, cached): KV-cache slots that stay valid
    reprefill_entries    #{new entries starting before the end of what the cache covered} - kept: entries
                         recomputed only because of the refocus (not the new tokens every decoder feeds)
    swap_rate            the fraction of the new entries that were not in the old working context
    residency            the fraction of the old entries still in the new one   (both as in Telemetry.md)
    and the allocator's: budget_used = entries / W (the cap), expands / collapses / forced edits, iterations.
Counters (stats()): reprefill_per_token = re-prefilled entries / appended tokens; history_tokens, wc_entries,
max_kv_entries, tree_bytes (memory held by the history state), mapped_bytes (its files with --mc_tree disk).
Events: focus_allocator, inference_update, mc_tree_snapshot, working_context_snapshot (mc/ops/telemetry.py).
"""

import torch

from mc.entry_allocator import first_changed_start
from mc.ops.telemetry import emit_event


def refocus_moves(old_start, old_lod, start, lod, cached: int, T: int, block_size: int, max_lod: int) -> dict:
    """What a refocus moved, from the entry lists before and after (long [L_old], [L_new]) and the KV-cache
    slots filled before it (module docstring)."""
    k = int((start < first_changed_start(old_start, old_lod, start, lod, T)).sum())
    kept = min(k, cached)
    cached_end = int(old_start[cached - 1] + block_size ** int(old_lod[cached - 1])) if cached else 0
    key = lambda s, level: s * (max_lod + 1) + level  # noqa: E731
    new_keys, old_keys = key(start, lod), key(old_start, old_lod)
    return dict(first_changed_entry=k, kept=kept,
                reprefill_entries=max(int((start < cached_end).sum()) - kept, 0),
                swap_rate=float((~torch.isin(new_keys, old_keys)).float().mean()) if len(new_keys) else 0.0,
                residency=float(torch.isin(old_keys, new_keys).float().mean()) if len(old_keys) else 1.0)


def add_refocus(totals: dict, last: dict):
    """Fold one refocus's metrics into the session's counters."""
    totals["refocuses"] += 1
    for name in ("expands", "collapses", "forced", "reprefill_entries", "refocus_ms"):
        totals[name] += last[name]
    totals["swap_rate_sum"] += last["swap_rate"]


def session_stats(s) -> dict:
    """MCSession.stats(): the counters since the start, the working context, the memory, the last refocus."""
    T = s.totals
    mem = s.memory_bytes()
    gen = T["generated_tokens"]
    return {
        "history_tokens": s.num_tokens, "wc_entries": s.num_entries, "W": s.W,
        "refocus_interval": s.refocus_interval, "kv_entries": s.kv.get_pos(),
        "max_kv_entries": T["max_kv_entries"],
        "lod_histogram": torch.bincount(s.entries()[1], minlength=s.max_lod + 1).tolist(),
        "budget_used": s.num_entries / s.W, "refocuses": T["refocuses"],
        "expands": T["expands"], "collapses": T["collapses"], "forced": T["forced"],
        "generated_tokens": gen, "ingested_tokens": T["ingested_tokens"],
        "reprefill_entries": T["reprefill_entries"], "forward_entries": T["forward_entries"],
        "reprefill_per_token": T["reprefill_entries"] / max(gen, 1),
        "mean_swap_rate": T["swap_rate_sum"] / max(T["refocuses"], 1),
        "mean_refocus_ms": T["refocus_ms"] / max(T["refocuses"], 1),
        "tree_bytes": mem["tree"] + mem["history"], "mapped_bytes": mem["mapped"],
        "kv_cache_bytes": mem["kv_cache"],
        "bytes_per_token": (mem["tree"] + mem["history"]) / max(s.num_tokens, 1),
        "last": dict(s.last),
    }


def emit_refocus_events(s, last: dict):
    """The four telemetry events of a refocus; resets the session's decode window (inference_update's)."""
    sid, step = s.session_id, s.totals["refocuses"]
    w, s._window = s._window, dict(generated=0, busy_s=0.0)
    emit_event(s.telemetry, "focus_allocator", {
        "session_id": sid, "expands": last["expands"], "collapses": last["collapses"], "forced": last["forced"],
        "iterations": last["iterations"], "budget_used": float(last["budget_used"])})
    emit_event(s.telemetry, "inference_update", {
        "session_id": sid, "tokens_ingested": s.num_tokens, "wc_length": s.num_entries,
        "swap_rate": last["swap_rate"], "residency": last["residency"],
        "reprefill_tokens": last["reprefill_entries"], "generated_tokens": w["generated"],
        "decode_ms_per_token": 1000 * w["busy_s"] / max(w["generated"], 1),
        "reprefill_per_token": s.totals["reprefill_entries"] / max(s.totals["generated_tokens"], 1)})
    lods = s.entries()[1]
    hist = torch.bincount(lods, minlength=s.max_lod + 1).tolist()
    lod_rows = [s.num_tokens] + [s.tree.num_entries(level) for level in range(1, s.max_lod + 1)]
    mem = s.memory_bytes()
    emit_event(s.telemetry, "mc_tree_snapshot", {
        "session_id": sid, "step": step, "lod0_entries": lod_rows[0], "lod1_entries": lod_rows[1],
        "lod2_entries": lod_rows[2] if s.max_lod >= 2 else 0, "memory_bytes": mem["tree"] + mem["history"]})
    coarse = (lods != 0).flip(0)  # the raw tail: trailing lod-0 entries (one token each)
    raw_tail = int(coarse.int().argmax()) if bool(coarse.any()) else s.num_tokens
    emit_event(s.telemetry, "working_context_snapshot", {
        "session_id": sid, "step": step, "wc_length": s.num_entries, "max_length": s.W,
        "lod_histogram": hist, "covered_tokens": s.num_tokens, "recent_raw_tokens": raw_tail})
