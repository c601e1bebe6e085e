"""Plain image search, evaluated: mAP@K and precision@K over a labelled gallery, each item querying the others."""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def image_retrieval_metrics(features: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (10, 100, 1000),
                            chunk_size: int = 512) -> dict:
    """Image-to-image retrieval over a labelled gallery: each item queries all others (itself excluded);
    an item is relevant when it shares a label. ``labels`` is a (N, C) boolean matrix (an item may have several).

    AP@K = sum over k <= K of precision@k at each relevant hit, divided by min(K, number of relevant items).
    """
    features = F.normalize(features.float(), dim=-1)
    labels = labels.float()
    n = features.shape[0]
    k_max = min(max(ks), n - 1)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("mAP", "P")}
    n_relevant = (labels @ labels.T > 0).sum(1) - 1
    start_time = time.perf_counter()
    for start in range(0, n, chunk_size):
        q = slice(start, min(start + chunk_size, n))
        scores = features[q] @ features.T
        scores[torch.arange(scores.shape[0]), torch.arange(q.start, q.stop)] = float("-inf")
        _, top = torch.topk(scores, k_max, dim=1)
        relevant = ((labels[q][:, None, :] * labels[top]).sum(-1) > 0).float()
        hits = relevant.cumsum(1)
        precision = hits / torch.arange(1, k_max + 1)
        for k in ks:
            kk = min(k, k_max)
            denominator = n_relevant[q].clamp(max=kk).clamp(min=1).float()
            sums[f"mAP@{k}"] += ((precision[:, :kk] * relevant[:, :kk]).sum(1) / denominator).sum().item()
            sums[f"P@{k}"] += (hits[:, kk - 1] / k).sum().item()
    seconds = time.perf_counter() - start_time
    metrics = {name: 100.0 * value / n for name, value in sums.items()}
    metrics["query_ms"] = 1000.0 * seconds / n
    return metrics
