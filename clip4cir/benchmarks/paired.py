"""Paired statistics of a variant against a baseline trained on the same seeds and scored on the same held-out
queries: the mean per-seed difference, the standard error the seeds give it, the one the query sample adds (a
bootstrap over queries), and a 95% interval from both, so a table can say whether more seeds or a larger catalog
would narrow it."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def paired_interval(variant: Sequence[float], baseline: Sequence[float], query_se: float = 0.0,
                    confidence: float = 0.95) -> dict:
    """Mean of the per-seed differences ``variant - baseline`` (at least two seeds) with its t interval (n - 1
    degrees of freedom) over the seeds' standard error combined with ``query_se``, the query sample's."""
    if len(variant) != len(baseline) or len(variant) < 2:
        raise ValueError(f"paired values need the same seeds, two or more: {len(variant)} against {len(baseline)}")
    diffs = np.asarray(variant, dtype=float) - np.asarray(baseline, dtype=float)
    mean, n = float(diffs.mean()), len(diffs)
    seed_se = float(diffs.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * math.hypot(seed_se, query_se))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "seed_se": seed_se, "query_se": query_se}


def query_sampling_se(variant: Sequence[dict], baseline: Sequence[dict], resamples: int = 2000,
                      seed: int = 0) -> float:
    """Standard error the query sample gives the mean paired difference in average Recall (percent): each
    seed's hits (category → 0/1 per query, the same queries in every seed) resampled with the same queries for
    both, averaged over categories as the protocol does."""
    categories = list(baseline[0])
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for category in categories:  # the per-query difference averaged over seeds, then queries resampled
        diff = np.mean([np.asarray(v[category], float) - np.asarray(b[category], float)
                        for v, b in zip(variant, baseline, strict=True)], axis=0)
        picks = rng.integers(len(diff), size=(resamples, len(diff)))
        total += diff[picks].mean(axis=1)
    return float(100.0 * (total / len(categories)).std(ddof=1))
