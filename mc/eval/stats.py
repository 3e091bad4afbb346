"""
Bootstrap confidence intervals over documents, for scripts/mc_eval.py.

Why resample documents (not tokens): tokens of one document are strongly correlated (the same facts,
the same names, one long context), so treating them as independent would give intervals far too
narrow. The unit of independence is the document: each bootstrap replicate draws D documents with
replacement from the D evaluated ones and recomputes the statistic from those documents' totals.

Paired resampling: every statistic that compares conditions (a NLL gap, the gap recovery R) is
computed from the SAME resampled documents for all conditions in a replicate, so the per-document
correlation between conditions cancels (a hard document is hard in every condition).

Estimators:
- token-weighted mean NLL of a token set: sum over documents of summed NLL / sum of token counts,
      NLL = sum_d s_d / sum_d n_d
  (documents with more tokens in the set weigh more; a document with n_d = 0 contributes nothing);
- gap recovery of condition c, computed from the three such means of ONE replicate:
      R = (NLL_recency - NLL_c) / (NLL_recency - NLL_full)
  R = 1: c recovers all of what full attention gains over the last-W window; 0: nothing; < 0: worse
  than the window alone. A replicate whose denominator is <= 0 (FULL no better than RECENCY on the
  resampled documents) has no R: it is dropped and counted in `undefined_frac`; the point estimate is
  None when the denominator on all documents is <= 0. The same formula with another reference in
  place of RECENCY (mc_eval: RECENCY-EQ, the last n raw tokens at MC's entry count) gives R_eq:
      R_eq = (NLL_recency_eq - NLL_c) / (NLL_recency_eq - NLL_full)
  the share of FULL's gain over an equal-entries raw window that c recovers (paired_bootstrap's
  `references`);
- percentile interval: the (alpha/2, 1 - alpha/2) quantiles of the replicates (alpha = 1 - level).
- comparing two conditions by their intervals (ci_overlap): [lo_a, hi_a] and [lo_b, hi_b] overlap iff
  lo_a <= hi_b and lo_b <= hi_a.

Everything is numpy, vectorised over replicates: indices [n_boot, D], one gather and sum per array.
"""

import numpy as np


def resample_indices(n_docs: int, n_boot: int, seed: int) -> np.ndarray:
    """int [n_boot, n_docs]: document indices drawn with replacement, deterministic in seed."""
    if n_docs < 1:
        raise ValueError("bootstrap needs at least one document")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n_docs, size=(n_boot, n_docs))


def _interval(samples: np.ndarray, level: float) -> tuple[float | None, float | None, float]:
    """(lo, hi, undefined_frac) of the finite samples."""
    finite = samples[np.isfinite(samples)]
    undefined = 1.0 - finite.size / max(samples.size, 1)
    if finite.size == 0:
        return None, None, undefined
    alpha = 1.0 - level
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi), float(undefined)


def bootstrap_ci(values_per_doc, n_boot: int = 1000, seed: int = 0, weights=None, level: float = 0.95) -> dict:
    """Mean of per-document values with a percentile CI over resampled documents.

    weights (e.g. token counts) make it the weighted mean sum(w v) / sum(w); pass values = s_d / n_d
    and weights = n_d to get the token-weighted mean NLL. Returns {"value", "lo", "hi", "n_docs"}
    (value None when there is no document, or all weights are 0)."""
    v = np.asarray(values_per_doc, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if v.shape != w.shape or v.ndim != 1:
        raise ValueError(f"values and weights must be 1-D of one length, got {v.shape} and {w.shape}")
    keep = w > 0
    v, w = v[keep], w[keep]
    if v.size == 0:
        return {"value": None, "lo": None, "hi": None, "n_docs": 0}
    idx = resample_indices(v.size, n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        samples = (v[idx] * w[idx]).sum(1) / w[idx].sum(1)
    lo, hi, _ = _interval(samples, level)
    return {"value": float((v * w).sum() / w.sum()), "lo": lo, "hi": hi, "n_docs": int(v.size)}


def gap_recovery(nll_recency: float, nll_cond: float, nll_full: float) -> float | None:
    """R = (NLL_recency - NLL_cond) / (NLL_recency - NLL_full); None if FULL does not beat RECENCY."""
    den = nll_recency - nll_full
    if not den > 0:
        return None
    return (nll_recency - nll_cond) / den


def paired_bootstrap(sums: dict, counts, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                     references: dict | None = None) -> dict:
    """Token-weighted mean NLL per condition, NLL gaps and gap recovery, all from paired replicates.

    sums: {condition: [D] summed NLL of the token set per document}; counts: [D] tokens per document
    (the same tokens in every condition). Documents with count 0 are left out. references: {output
    key: reference condition} of the gap recoveries to compute (default {"gap_recovery": "RECENCY"}).
    Returns
        {"n_docs", "n_tokens",
         "nll": {cond: {"value", "lo", "hi"}},
         "delta_vs_recency": {cond: {"value", "lo", "hi"}}   NLL_cond - NLL_RECENCY (needs RECENCY),
         KEY: {cond: {"value", "lo", "hi", "undefined_frac"}} per reference (needs FULL and the reference;
              {} otherwise)}
    """
    references = references or {"gap_recovery": "RECENCY"}
    n = np.asarray(counts, dtype=np.float64)
    keep = n > 0
    n = n[keep]
    s = {c: np.asarray(v, dtype=np.float64)[keep] for c, v in sums.items()}
    out = {"n_docs": int(n.size), "n_tokens": int(n.sum()), "nll": {}, "delta_vs_recency": {},
           **{key: {} for key in references}}
    if n.size == 0:
        return out
    idx = resample_indices(n.size, n_boot, seed)
    n_b = n[idx].sum(1)
    point = {c: float(v.sum() / n.sum()) for c, v in s.items()}
    boot = {c: v[idx].sum(1) / n_b for c, v in s.items()}
    for c in s:
        lo, hi, _ = _interval(boot[c], level)
        out["nll"][c] = {"value": point[c], "lo": lo, "hi": hi}
    if "RECENCY" in s:
        for c in s:
            lo, hi, _ = _interval(boot[c] - boot["RECENCY"], level)
            out["delta_vs_recency"][c] = {"value": point[c] - point["RECENCY"], "lo": lo, "hi": hi}
    for key, ref in references.items():
        if ref in s and "FULL" in s:
            out[key] = _gap_recoveries(boot, point, ref, level)
    return out


def _gap_recoveries(boot: dict, point: dict, ref: str, level: float) -> dict:
    """{cond: {"value", "lo", "hi", "undefined_frac"}}: R of every condition against reference `ref`,
    per paired replicate (replicates where FULL does not beat the reference have no R)."""
    out = {}
    den = boot[ref] - boot["FULL"]
    for c in boot:
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(den > 0, (boot[ref] - boot[c]) / np.where(den > 0, den, 1.0), np.nan)
        lo, hi, undefined = _interval(r, level)
        value = gap_recovery(point[ref], point[c], point["FULL"])
        out[c] = {"value": value, "lo": lo if value is not None else None,
                  "hi": hi if value is not None else None, "undefined_frac": undefined}
    return out


def ci_overlap(a: dict | None, b: dict | None) -> bool | None:
    """Whether two {"lo", "hi"} intervals overlap (None when either has no interval). Non-overlapping
    95% intervals are a conservative sign of a real difference; overlapping ones do not prove equality."""
    if not a or not b or None in (a.get("lo"), a.get("hi"), b.get("lo"), b.get("hi")):
        return None
    return a["lo"] <= b["hi"] and b["lo"] <= a["hi"]
