"""Paired statistics of a variant against a baseline trained on the same seeds: the mean per-seed difference with
a t interval over seeds, and how much of that uncertainty the held-out queries alone would give (a bootstrap over
queries), so a table can say whether more seeds or a larger catalog would narrow it."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats


def paired_interval(variant: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of the per-seed differences ``variant - baseline`` with its t confidence interval (n - 1 degrees of
    freedom); one seed has no interval (infinite bounds)."""
    if len(variant) != len(baseline) or not variant:
        raise ValueError(f"paired values need the same seeds: {len(variant)} against {len(baseline)}")
    diffs = np.asarray(variant, dtype=float) - np.asarray(baseline, dtype=float)
    mean, n = float(diffs.mean()), len(diffs)
    if n == 1:
        return {"mean": mean, "low": -math.inf, "high": math.inf, "n": 1}
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def query_sampling_se(variant: Sequence[dict], baseline: Sequence[dict], resamples: int = 2000,
                      seed: int = 0) -> float:
    """Standard error, from the queries alone, of the mean paired difference in average Recall (percent): each
    seed's hits (category → 0/1 per query, the same queries in every seed) resampled with the same queries for
    both, averaged over categories as the protocol does."""
    categories = list(baseline[0])
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for category in categories:  # the per-query difference averaged over seeds, then queries resampled
        diff = np.mean([np.asarray(v[category], float) - np.asarray(b[category], float)
                        for v, b in zip(variant, baseline)], axis=0)
        picks = rng.integers(len(diff), size=(resamples, len(diff)))
        total += diff[picks].mean(axis=1)
    return float(100.0 * (total / len(categories)).std(ddof=1))
