"""Evaluation tasks, by name (``--task``): each takes an encoder, a data set and an :class:`EvalRequest` and
gives its metrics. ``composed``: Recall@K under the data set's protocol (and its rankings, for per-query dumps and
test-server predictions); ``image``: image-search mAP@K / P@K; ``category``: how often ``category="auto"`` is
right; ``labels``: retrieval on held-out labels, zero-shot beside fine-tuned; ``pairs``: text→image and
image→text retrieval on held-out image-text pairs."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clip4cir.core.errors import DataError
from clip4cir.core.registry import Registry
from clip4cir.data.datasets import GalleryDataset
from clip4cir.data.sources import Source
from clip4cir.data.sources.labels import LabelledImages
from clip4cir.evaluation.category_choice import ranks_within
from clip4cir.evaluation.composed import Ranking, rankings_of, summarize
from clip4cir.evaluation.image_search import image_retrieval_metrics
from clip4cir.evaluation.labels import label_metrics
from clip4cir.evaluation.pairs import pair_metrics
from clip4cir.evaluation.ranking import recall_at_k
from clip4cir.models.category_probe import predict_category, train_probe
from clip4cir.models.combiner import Combine, compose_queries
from clip4cir.models.encoder import Encoder
from clip4cir.models.factory import load_model
from clip4cir.models.feature_sum import combine_sum
from clip4cir.models.features import extract_image_features
from clip4cir.models.reranker import Reranker


@dataclass
class EvalRequest:
    """What to evaluate on and how: the split, the combining function (composed) and its re-ranker, where gallery
    features are cached, and the batch, workers and progress of feature extraction."""

    split: str
    combine: Combine = combine_sum
    reranker: Reranker | None = None
    cache_dir: str | os.PathLike | None = None
    batch_size: int = 64
    workers: int = 0
    progress: bool = True


@dataclass
class TaskResult:
    metrics: dict
    rankings: list[Ranking] = field(default_factory=list)  # composed retrieval's, for dumps and predictions


Task = Callable[[Encoder, Source, EvalRequest], TaskResult]
TASKS: Registry[Task] = Registry("--task")


@TASKS.register("composed")
def composed_task(encoder: Encoder, source: Source, request: EvalRequest) -> TaskResult:
    """Recall@K under the protocol; on a test split (no targets) the rankings alone."""
    rankings = rankings_of(encoder, source, request.split, request.combine, request.cache_dir, request.batch_size,
                           request.workers, request.progress, reranker=request.reranker)
    scored = all(r.ranks is not None for r in rankings)
    return TaskResult(summarize(rankings, source.protocol) if scored else {}, rankings)


@TASKS.register("image")
def image_task(encoder: Encoder, source: Source, request: EvalRequest) -> TaskResult:
    """Image-to-image metrics over the split's images, relevance = sharing a category."""
    categories = source.categories()
    if not categories:
        raise DataError(f"--task image needs categories (relevance is sharing one); {source.describe()} has none")
    dataset = GalleryDataset(source, request.split, transform=encoder.transform)
    ids, features = extract_image_features(encoder, dataset, request.batch_size, request.workers, request.progress)
    labels = torch.tensor([[c in dataset.categories_of[i] for c in categories] for i in ids])
    return TaskResult({**image_retrieval_metrics(features, labels), "images": len(ids)})


@TASKS.register("category")
def category_task(encoder: Encoder, source: Source, request: EvalRequest) -> TaskResult:
    """How often ``category="auto"`` is right (the probe trained on train-split images, scored on the split's),
    and, for the split's composed queries, Recall@K over the whole gallery when each searches all items, the
    reference's own category, or the category the probe predicts from the reference image or the composed query."""
    features = {}
    train = source.splits()[0]
    for split in (train, request.split):
        dataset = GalleryDataset(source, split, transform=encoder.transform)
        ids, feats = extract_image_features(encoder, dataset, request.batch_size, request.workers, request.progress)
        features[split] = (ids, feats, dataset.categories_of)
    ids, feats, categories_of = features[train]
    probe = train_probe(feats.numpy(), [categories_of[i] for i in ids])
    if probe is None:
        raise DataError(f"--task category needs at least two categories; {source.describe()} has "
                        f"{len(source.categories())}")
    ids, feats, categories_of = features[request.split]
    predicted = predict_category(probe, feats.numpy())
    right = sum(p in categories_of[i] for p, i in zip(predicted, ids, strict=True))
    metrics = {"accuracy": 100.0 * right / len(ids), "images": len(ids), "train_images": len(features[train][0])}
    triplets = [t for t in source.triplets(request.split) if t.target is not None]
    if triplets:
        metrics["composed"] = composed_category_choices(encoder, request, probe, triplets, ids, feats, categories_of)
    return TaskResult(metrics)


def composed_category_choices(encoder: Encoder, request: EvalRequest, probe: dict, triplets: list, ids: list[str],
                              feats: torch.Tensor, categories_of: dict) -> dict:
    """Recall@10/50 of the composed queries over the whole gallery for each way the app can choose a category,
    and how often the chosen category is the target's."""
    position = {image_id: i for i, image_id in enumerate(ids)}
    reference = feats[[position[t.reference] for t in triplets]]
    queries = compose_queries(encoder, request.combine, reference, [t.eval_caption() for t in triplets]
                              ).float().cpu()
    gallery = F.normalize(feats, dim=-1)
    choices = {"all": [None] * len(triplets),
               "reference": [(categories_of[t.reference] or [None])[0] for t in triplets],
               "reference image (probe)": predict_category(probe, reference.numpy()),
               "auto (probe on the query)": predict_category(probe, queries.numpy())}
    targets, exclude = [position[t.target] for t in triplets], [position[t.reference] for t in triplets]
    out = {"queries": len(triplets)}
    for name, chosen in choices.items():
        ranks = ranks_within(queries, gallery, targets, exclude, [categories_of[i] for i in ids], chosen)
        out[name] = {**recall_at_k(ranks), "right_category": 100.0 * sum(
            c is None or c in categories_of[t.target] for c, t in zip(chosen, triplets, strict=True)) / len(triplets)}
    return out


@TASKS.register("labels")
def labels_task(encoder: Encoder, source: Source, request: EvalRequest) -> TaskResult:
    """Retrieval on held-out labels (Recall@1/2/4/8, MAP@R, R-precision; top-10 attribute agreement where there
    are attributes) for the encoder and, when it is a fine-tuned file, for the encoder it started from, with the
    fine-tuned encoder's preprocessing (like is compared with like)."""
    if not isinstance(source, LabelledImages):
        raise DataError(f"--task labels needs labelled images (--dataset labels); {source.describe()} has none")
    origin = encoder.source
    tuned = "checkpoint" in origin
    encoders = {"fine-tuned" if tuned else "encoder": encoder}
    if tuned and origin.get("model"):
        zero_shot = load_model(origin["model"], origin.get("pretrained"), seed=origin.get("seed", 0),
                               preprocess_kind=encoder.preprocess.kind, target_ratio=encoder.preprocess.target_ratio,
                               device=encoder.device, embed_dim=origin.get("embed_dim"))
        encoders = {"zero-shot": zero_shot, **encoders}
    out = {}
    numbers = source.label_numbers(request.split)
    for name, model in encoders.items():
        metrics = label_metrics(model, source, request.split, request.batch_size, request.workers, request.progress,
                                attributes=True)
        out[name] = {**metrics, "model": model.describe(), "images": len(numbers),
                     "labels": len(set(numbers.values()))}
    return TaskResult(out)


@TASKS.register("pairs")
def pairs_task(encoder: Encoder, source: Source, request: EvalRequest) -> TaskResult:
    """Text→image and image→text Recall@1/5/10 on the split's image-text pairs."""
    if not source.texts(request.split):
        raise DataError(f"--task pairs needs image-text pairs (--dataset pairs); {source.describe()} has no "
                        f"{request.split} texts")
    if not encoder.has_text:
        raise DataError(f"--task pairs needs an encoder with a text tower; {encoder.describe()} has none")
    return TaskResult(pair_metrics(encoder, source, request.split, request.batch_size, request.workers,
                                   request.progress))
