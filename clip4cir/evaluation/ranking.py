"""Ranking by inner product, without sorting the score matrix: the rank of each query's target (ties to the lower
gallery index, as a stable sort would), within a query's subset, Recall@K, and the top-k items, chunk by chunk.
Small pure functions that the tests check against brute-force NumPy."""
from __future__ import annotations

from collections.abc import Sequence

import torch

RECALL_KS = (10, 50)


def target_ranks(queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor,
                 exclude: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """0-based rank of each query's target in the gallery by descending inner product, ties to the lower index;
    ``exclude`` (a gallery index per query, -1 for none: the reference) is left out of the ranking."""
    targets = targets.long()
    positions = torch.arange(gallery.shape[0])
    ranks = torch.empty(queries.shape[0], dtype=torch.long)
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start:start + chunk_size] @ gallery.T
        t = targets[start:start + chunk_size, None]
        target_scores = scores.gather(1, t)
        before = (scores > target_scores) | ((scores == target_scores) & (positions[None, :] < t))
        if exclude is not None:
            e = exclude[start:start + chunk_size, None].long()
            before &= ~((positions[None, :] == e) & (e != t))
        ranks[start:start + chunk_size] = before.sum(1)
    return ranks


def subset_ranks(queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor,
                 members: Sequence[Sequence[int]]) -> torch.Tensor:
    """0-based rank of each target among its query's subset (gallery indices, the reference already left out),
    by descending score, ties to the lower gallery index."""
    ranks = torch.empty(len(members), dtype=torch.long)
    for i, (query, target, subset) in enumerate(zip(queries, targets.tolist(), members, strict=True)):
        subset = torch.tensor(sorted(set(subset)), dtype=torch.long)
        scores, target_score = gallery[subset] @ query, gallery[target] @ query
        ranks[i] = int(((scores > target_score) | ((scores == target_score) & (subset < target))).sum())
    return ranks


def average_precision_at_k(found: Sequence, truths: set, k: int) -> float:
    """AP@K of one ranked list against a query's ground truths (CIRCO's definition): the sum of the precisions at
    the ranks within K that hold a ground truth, over min(K, number of ground truths)."""
    hits, total = 0, 0.0
    for rank, item in enumerate(found[:k], 1):
        if item in truths:
            hits += 1
            total += hits / rank
    return total / min(k, len(truths)) if truths else 0.0


def map_at_k(found: Sequence[Sequence], truths: Sequence[set], ks: Sequence[int]) -> dict[str, float]:
    """mAP@K in percent over queries: each query's ranked ids (unique) against its ground truths."""
    return {f"mAP@{k}": 100.0 * sum(average_precision_at_k(f, t, k) for f, t in zip(found, truths, strict=True))
            / max(len(found), 1) for k in ks}


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = RECALL_KS, prefix: str = "R") -> dict[str, float]:
    """Recall@K in percent: the share of queries whose target ranks within the top K."""
    return {f"{prefix}@{k}": 100.0 * (ranks < k).float().mean().item() for k in ks}


def top_k(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
          chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery items (scores, indices) per query, chunk by chunk; ``exclude`` as in target_ranks."""
    k = min(k, gallery.shape[0] - (exclude is not None))
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        block = queries[start:start + chunk_size] @ gallery.T
        if exclude is not None:
            e = exclude[start:start + chunk_size].long()
            rows = torch.nonzero(e >= 0).squeeze(1)
            block[rows, e[rows]] = float("-inf")
        s, i = torch.topk(block, k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)
