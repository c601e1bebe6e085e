"""Evaluation: FashionIQ Recall@K for composed retrieval, and mAP@K / precision@K for plain image search.

Rankings use chunked matrix products: a target's rank is counted (items scoring higher, ties broken by gallery
order, as a stable sort would), never found by sorting the score matrix; top-k lists use ``torch.topk``.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .data import CATEGORIES, count_empty_captions, eval_caption, load_triplets, parse_categories
from .encoder import CLIPEncoder
from .errors import DataError
from .features import check_finite, encode_texts, gallery_features
from .fusion import Combine, combine_sum

RECALL_KS = (10, 50)


def target_ranks(queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor,
                 chunk_size: int = 1024) -> torch.Tensor:
    """0-based rank of each query's target in the gallery by descending inner product; ties go to the lower index."""
    targets = targets.long()
    positions = torch.arange(gallery.shape[0])
    ranks = torch.empty(queries.shape[0], dtype=torch.long)
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start:start + chunk_size] @ gallery.T
        t = targets[start:start + chunk_size, None]
        target_scores = scores.gather(1, t)
        ranks[start:start + chunk_size] = (scores > target_scores).sum(1) + \
            ((scores == target_scores) & (positions[None, :] < t)).sum(1)
    return ranks


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@K in percent: the share of queries whose target ranks within the top K."""
    return {f"R@{k}": 100.0 * (ranks < k).float().mean().item() for k in ks}


def top_k(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 1024
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery items (scores, indices) per query, chunk by chunk."""
    k = min(k, gallery.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        s, i = torch.topk(queries[start:start + chunk_size] @ gallery.T, k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


@dataclass
class CategoryRanking:
    """One category's evaluation: the gallery, its queries, and where each target ranked."""

    category: str
    gallery_ids: list[str]
    triplets: list
    queries: torch.Tensor
    gallery: torch.Tensor
    ranks: torch.Tensor | None  # None on the test split (no targets)


def rank_category(encoder: CLIPEncoder, root: str | os.PathLike, category: str, combine: Combine = combine_sum,
                  split: str = "val", cache_dir: str | os.PathLike | None = None, batch_size: int = 64,
                  workers: int = 0, progress: bool = True,
                  gallery: tuple[list[str], torch.Tensor] | None = None) -> CategoryRanking:
    """Composed queries ("c1 and c2" + reference image) of one category ranked against its split gallery
    (``gallery``: its ids and features, when already extracted with this encoder)."""
    ids, features = gallery or gallery_features(encoder, root, split, category, cache_dir, batch_size, workers,
                                                progress)
    index = {image_id: i for i, image_id in enumerate(ids)}
    triplets = load_triplets(root, category, split)
    empty = count_empty_captions(triplets)
    if empty:  # the published protocol counts these queries: keep them, but say so
        warnings.warn(f"{empty:,} of {len(triplets):,} {category} {split} queries have an empty caption (such as '' or "
                      f"'n/a'); they are kept, as in CLIP4Cir's evaluation and the published figures")
    for t in triplets:
        for role, image_id in (("reference", t.reference), ("target", t.target)):
            if image_id is not None and image_id not in index:
                raise DataError(f"{role} {image_id} of a {category} {split} triplet is not in the gallery "
                                f"image_splits/split.{category}.{split}.json")
    text = encode_texts(encoder, [eval_caption(t.captions) for t in triplets])
    device = encoder.device
    reference = features[[index[t.reference] for t in triplets]]
    with torch.inference_mode():
        queries = check_finite(combine(reference.to(device), text.to(device)).float().cpu(),
                               f"{category} {split} query features")
    gallery = F.normalize(check_finite(features, f"{category} {split} gallery features"), dim=-1)
    ranks = None
    if split != "test":
        ranks = target_ranks(queries, gallery, torch.tensor([index[t.target] for t in triplets]))
    return CategoryRanking(category, ids, triplets, queries, gallery, ranks)


def summarize(rankings: Sequence[CategoryRanking], ks: Sequence[int] = RECALL_KS) -> dict:
    """Per-category Recall@K and their average, in percent."""
    metrics = {r.category: recall_at_k(r.ranks, ks) for r in rankings}
    metrics["average"] = {f"R@{k}": sum(m[f"R@{k}"] for m in metrics.values()) / len(rankings) for k in ks}
    return metrics


def fashioniq_recall(encoder: CLIPEncoder, root: str | os.PathLike, categories: str | Sequence[str] = CATEGORIES,
                     combine: Combine = combine_sum, cache_dir: str | os.PathLike | None = None,
                     batch_size: int = 64, workers: int = 0, progress: bool = True) -> dict:
    """The standard FashionIQ validation protocol: Recall@10/50 per category and averaged."""
    rankings = [rank_category(encoder, root, c, combine, "val", cache_dir, batch_size, workers, progress)
                for c in parse_categories(categories)]
    return summarize(rankings)


def query_records(ranking: CategoryRanking, k: int = 10) -> list[dict]:
    """Per-query results for inspection: reference, captions, target, the target's rank, the top-k ids."""
    _, top = top_k(ranking.queries, ranking.gallery, k)
    records = []
    for i, t in enumerate(ranking.triplets):
        record = {"category": ranking.category, "reference": t.reference, "captions": list(t.captions),
                  "caption": eval_caption(t.captions)}
        if ranking.ranks is not None:
            record.update(target=t.target, target_rank=int(ranking.ranks[i]) + 1)
        record[f"top{k}"] = [ranking.gallery_ids[j] for j in top[i].tolist()]
        records.append(record)
    return records


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
