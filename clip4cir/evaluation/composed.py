"""Evaluation: Recall@K for composed retrieval under each data set's protocol, and mAP@K / precision@K for
plain image search.

Protocols (``Source.protocol``): FashionIQ ranks each category's queries against that category's split gallery
(the reference stays in the ranking, as CLIP4Cir and the published figures do) and averages Recall@10/50 over
categories. CIRR ranks against every image of the split with the reference left out of its own ranking
(Recall@1/5/10/50), and within each query's image subset, less the reference (Recall_subset@1/2/3); its "Avg"
is the mean of R@5 and Rs@1. Rankings use chunked matrix products: a target's rank is counted (items scoring
higher, ties broken by gallery order, as a stable sort would), never found by sorting the score matrix.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clip4cir.core.errors import DataError
from clip4cir.data.captions import count_empty_captions
from clip4cir.data.sources import EvaluationProtocol, Source, Triplet
from clip4cir.evaluation.ranking import map_at_k, recall_at_k, subset_ranks, target_ranks, top_k
from clip4cir.models.combiner import Combine, compose_queries
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.feature_sum import combine_sum
from clip4cir.models.features import check_finite, encode_texts, gallery_features
from clip4cir.models.reranker import Reranker


@dataclass
class Ranking:
    """One gallery's evaluation (a category's, or the whole split's): its queries and where each target ranked."""

    name: str
    gallery_ids: list[str]
    triplets: list[Triplet]
    queries: torch.Tensor
    gallery: torch.Tensor
    exclude: torch.Tensor | None  # the reference's gallery index per query (-1 if absent), when left out
    ranks: torch.Tensor | None  # None on a test split (no targets)
    subset_ranks: torch.Tensor | None = None


def split_queries(source: Source, split: str, category: str | None, index: dict[str, int]) -> list[Triplet]:
    """The triplets whose composed queries a gallery is evaluated on, each image checked to be in the gallery
    (``index``: gallery id -> position); empty captions are kept, as the published protocol does, and counted."""
    triplets = [t for t in source.triplets(split) if category is None or t.category == category]
    name = f"{category} " if category else ""
    if not triplets:
        raise DataError(f"no {split} queries{f' of {category}' if category else ''} in {source.describe()}")
    empty = count_empty_captions(triplets)
    if empty:  # the published protocol counts these queries: keep them, but say so
        warnings.warn(f"{empty:,} of {len(triplets):,} {name}{split} queries have an empty caption (such as '' or "
                      f"'n/a'); they are kept, as in CLIP4Cir's evaluation and the published figures", stacklevel=3)
    for t in triplets:
        for role, image_id in (("reference", t.reference), ("target", t.target)):
            if image_id is not None and image_id not in index:
                raise DataError(f"{role} {image_id} of a {name}{split} triplet is not in the {name}{split} gallery "
                                f"of {source.describe()}")
    return triplets


def ranks_of(queries: torch.Tensor, gallery: torch.Tensor, triplets: Sequence[Triplet], index: dict[str, int],
             exclude: torch.Tensor | None, subsets: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each target's rank in the gallery (and within its query's subset, when ``subsets``); (None, None) on a
    split without targets."""
    if not all(t.target is not None for t in triplets):
        return None, None
    targets = torch.tensor([index[t.target] for t in triplets])
    ranks = target_ranks(queries, gallery, targets, exclude)
    if not subsets:
        return ranks, None
    members = [[index[m] for m in t.subset if m != t.reference] for t in triplets]
    return ranks, subset_ranks(queries, gallery, targets, members)


def reranked_ranks(reranker: Reranker, reference: torch.Tensor, texts: torch.Tensor, queries: torch.Tensor,
                   gallery: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None, ranks: torch.Tensor,
                   chunk: int = 256) -> torch.Tensor:
    """Each target's rank once the re-ranker has re-ordered the first ``reranker.depth`` candidates of its query
    (a target further down keeps its rank ``ranks``)."""
    out = []
    for start in range(0, len(queries), chunk):
        part = slice(start, start + chunk)
        first, top = top_k(queries[part], gallery, reranker.depth, None if exclude is None else exclude[part])
        order = reranker.rerank(torch.stack([reference[part], texts[part], queries[part]], 1), gallery[top], first)
        found = torch.gather(top, 1, order) == targets[part, None]
        out.append(torch.where(found.any(1), found.float().argmax(1), ranks[part]))
    return torch.cat(out)


def rank_split(encoder: CLIPEncoder, source: Source, split: str, category: str | None = None,
               combine: Combine = combine_sum, cache_dir: str | os.PathLike | None = None, batch_size: int = 64,
               workers: int = 0, progress: bool = True, gallery: tuple[list[str], torch.Tensor] | None = None,
               reranker: Reranker | None = None) -> Ranking:
    """The composed queries (evaluation caption + reference image) of a split, or of one category, ranked
    against its gallery as the source's protocol says (``gallery``: its ids and features, when extracted
    already with this encoder), the first candidates re-ordered by ``reranker`` when given (Recall@K; the
    subset recall and mAP@K stay the first stage's)."""
    protocol = source.protocol
    ids, features = gallery or gallery_features(encoder, source, split, category, cache_dir, batch_size, workers,
                                                progress)
    index = {image_id: i for i, image_id in enumerate(ids)}
    triplets = split_queries(source, split, category, index)
    name = f"{category} " if category else ""
    reference = features[[index[t.reference] for t in triplets]]
    queries = check_finite(compose_queries(encoder, combine, reference, [t.eval_caption() for t in triplets])
                           .float().cpu(), f"{name}{split} query features")
    gallery_matrix = F.normalize(check_finite(features, f"{name}{split} gallery features"), dim=-1)
    exclude = torch.tensor([index[t.reference] for t in triplets]) if protocol.remove_reference else None
    ranks, subsets = ranks_of(queries, gallery_matrix, triplets, index, exclude, bool(protocol.subset_ks))
    if reranker is not None and ranks is not None:
        texts = encode_texts(encoder, [t.eval_caption() for t in triplets]).float().cpu()
        ranks = reranked_ranks(reranker, reference.float().cpu(), texts, F.normalize(queries, dim=-1), gallery_matrix,
                               torch.tensor([index[t.target] for t in triplets]), exclude, ranks)
    return Ranking(category or "all", ids, triplets, queries, gallery_matrix, exclude, ranks, subsets)


def rankings_of(encoder: CLIPEncoder, source: Source, split: str, combine: Combine = combine_sum,
                cache_dir: str | os.PathLike | None = None, batch_size: int = 64, workers: int = 0,
                progress: bool = True, galleries: dict | None = None, reranker: Reranker | None = None
                ) -> list[Ranking]:
    """The rankings the protocol asks for: one per category, or one for the split."""
    names = source.categories() if source.protocol.per_category else [None]
    return [rank_split(encoder, source, split, name, combine, cache_dir, batch_size, workers, progress,
                       (galleries or {}).get(name), reranker) for name in names]


def ground_truth_metrics(r: Ranking, ks: Sequence[int]) -> dict[str, float]:
    """mAP@K over each query's ground truths (CIRCO), and mAP@10 per semantic aspect ("mAP@10 ASPECT")."""
    _, top = top_k(r.queries, r.gallery, max(ks), r.exclude)
    found = [[r.gallery_ids[j] for j in row] for row in top.tolist()]
    truths = [set(t.ground_truths) for t in r.triplets]
    out = map_at_k(found, truths, ks)
    for aspect in sorted({a for t in r.triplets for a in t.aspects}):
        rows = [n for n, t in enumerate(r.triplets) if aspect in t.aspects]
        out[f"mAP@10 {aspect}"] = map_at_k([found[n] for n in rows], [truths[n] for n in rows], [10])["mAP@10"]
    return out


def summarize(rankings: Sequence[Ranking], protocol: EvaluationProtocol) -> dict:
    """Recall@K (and Recall_subset@K) per ranking, their average, and the protocol's headline ``score``, in percent."""
    metrics = {}
    for r in rankings:
        metrics[r.name] = recall_at_k(r.ranks, protocol.ks)
        if r.subset_ranks is not None:
            metrics[r.name].update(recall_at_k(r.subset_ranks, protocol.subset_ks, prefix="Rs"))
        if protocol.map_ks:
            metrics[r.name].update(ground_truth_metrics(r, protocol.map_ks))
    keys = list(metrics[rankings[0].name])
    metrics["average"] = {k: sum(m[k] for m in metrics.values()) / len(rankings) for k in keys}
    metrics["score"] = sum(metrics["average"][k] for k in protocol.score) / len(protocol.score)
    return metrics


def evaluate(encoder: CLIPEncoder, source: Source, split: str | None = None, combine: Combine = combine_sum,
             cache_dir: str | os.PathLike | None = None, batch_size: int = 64, workers: int = 0,
             progress: bool = True, reranker: Reranker | None = None) -> dict:
    """The source's validation protocol (its val split unless ``split``): the metrics ``summarize`` gives."""
    split = split or source.protocol.val_split
    return summarize(rankings_of(encoder, source, split, combine, cache_dir, batch_size, workers, progress,
                                 reranker=reranker), source.protocol)


BLEND_WEIGHTS = tuple(i / 10 for i in range(11))


def blended(combined: Sequence[Ranking], summed: Sequence[Ranking], weight: float) -> list[Ranking]:
    """The rankings of the queries weight · Combiner query + (1 − weight) · sum query, on the same galleries."""
    out = []
    for c, s in zip(combined, summed, strict=True):
        queries = weight * c.queries + (1 - weight) * s.queries
        index = {image_id: i for i, image_id in enumerate(c.gallery_ids)}
        ranks, subsets = ranks_of(queries, c.gallery, c.triplets, index, c.exclude, c.subset_ranks is not None)
        out.append(Ranking(c.name, c.gallery_ids, c.triplets, queries, c.gallery, c.exclude, ranks, subsets))
    return out


def choose_blend(encoder: CLIPEncoder, source: Source, combiner, split: str | None = None,
                 weights: Sequence[float] = BLEND_WEIGHTS, **options) -> tuple[float, dict]:
    """The blend weight of the Combiner's scores against the sum's that scores best on ``split`` (the source's
    validation split), and the metrics there: the galleries and captions are encoded once for all weights."""
    split = split or source.protocol.val_split
    galleries = {name: gallery_features(encoder, source, split, name, options.get("cache_dir"),
                                        options.get("batch_size", 64), options.get("workers", 0),
                                        options.get("progress", True))
                 for name in (source.categories() if source.protocol.per_category else [None])}
    combined = rankings_of(encoder, source, split, lambda i, t: combiner.combine(i, t, blend=1.0), galleries=galleries)
    summed = rankings_of(encoder, source, split, combine_sum, galleries=galleries)
    scored = [(summarize(blended(combined, summed, w), source.protocol), w) for w in weights]
    metrics, weight = max(scored, key=lambda mw: (mw[0]["score"], mw[1]))
    return weight, metrics


def query_records(ranking: Ranking, k: int = 10) -> list[dict]:
    """Per-query results for inspection: reference, captions, target, the target's rank, the top-k ids."""
    _, top = top_k(ranking.queries, ranking.gallery, k, ranking.exclude)
    records = []
    for i, t in enumerate(ranking.triplets):
        record = {"category": t.category, "reference": t.reference, "captions": list(t.captions),
                  "caption": t.eval_caption()}
        if ranking.ranks is not None:
            record.update(target=t.target, target_rank=int(ranking.ranks[i]) + 1)
        record[f"top{k}"] = [ranking.gallery_ids[j] for j in top[i].tolist()]
        records.append(record)
    return records


def _coco_id(image_id: str) -> int | str:
    """A CIRCO image id as its test server takes it: COCO's number (the published example submission's type)."""
    return int(image_id) if image_id.isdigit() else image_id


def test_predictions(rankings: Sequence[Ranking], protocol: EvaluationProtocol) -> dict[str, dict | list]:
    """What a test server takes, by file name: CIRR's two JSON files (top-50 of the gallery, top-3 of the
    subset, by pair id); CIRCO's (the top 50 unique ids by query id); otherwise the top-50 ids of each query."""
    if protocol.name == "circo":
        (ranking,) = rankings
        _, top = top_k(ranking.queries, ranking.gallery, 50, ranking.exclude)
        return {"circo_test_submission.json": {t.pair_id: [_coco_id(ranking.gallery_ids[j]) for j in row]
                                               for t, row in zip(ranking.triplets, top.tolist(), strict=True)}}
    if protocol.name == "cirr":
        (ranking,) = rankings
        _, top = top_k(ranking.queries, ranking.gallery, 50, ranking.exclude)
        recall = {"version": "rc2", "metric": "recall"}
        subset = {"version": "rc2", "metric": "recall_subset"}
        index = {image_id: i for i, image_id in enumerate(ranking.gallery_ids)}
        for t, query, row in zip(ranking.triplets, ranking.queries, top.tolist(), strict=True):
            recall[t.pair_id] = [ranking.gallery_ids[j] for j in row]
            members = sorted({index[m] for m in t.subset if m != t.reference})
            scores = ranking.gallery[members] @ query
            order = sorted(range(len(members)), key=lambda j: (-float(scores[j]), members[j]))
            subset[t.pair_id] = [ranking.gallery_ids[members[j]] for j in order[:3]]
        return {"recall_submission.json": recall, "recall_subset_submission.json": subset}
    out = {}
    for r in rankings:
        _, top = top_k(r.queries, r.gallery, 50, r.exclude)
        out[r.name] = [{"reference": t.reference, "captions": list(t.captions),
                        "top50": [r.gallery_ids[j] for j in row]}
                       for t, row in zip(r.triplets, top.tolist(), strict=True)]
    return {"predictions.json": out}
