"""Retrieval learned from labels, evaluated: each image of a split queries the others, an image of the same label
is relevant. Recall@1/2/4/8, MAP@R, R-precision and precision@1 (pytorch-metric-learning's AccuracyCalculator),
and the top-10 attribute agreement of face retrieval where images have binary attributes."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from clip4cir.data.datasets import GalleryDataset
from clip4cir.data.sources.labels import LabelledImages
from clip4cir.models.encoder import Encoder
from clip4cir.models.features import extract_image_features

RECALL_KS = (1, 2, 4, 8)


def recall_at_k(features: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@K of metric learning, in percent: the share of queries with an item of their label among their K
    nearest others (each item queries the rest)."""
    features = F.normalize(features.float(), dim=-1)
    scores = features @ features.T
    scores.fill_diagonal_(float("-inf"))
    top = torch.topk(scores, max(ks), dim=1).indices
    same = labels[top] == labels[:, None]
    return {f"R@{k}": 100.0 * same[:, :k].any(1).float().mean().item() for k in ks}


def retrieval_metrics(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Recall@1/2/4/8, and pytorch-metric-learning's MAP@R, R-precision and precision@1, in percent."""
    calculator = AccuracyCalculator(include=("mean_average_precision_at_r", "r_precision", "precision_at_1"),
                                    device=torch.device("cpu"))
    features = F.normalize(features.float(), dim=-1)
    accuracy = calculator.get_accuracy(features, labels, features, labels, ref_includes_query=True)
    return {**recall_at_k(features, labels), "MAP@R": 100.0 * accuracy["mean_average_precision_at_r"],
            "R-precision": 100.0 * accuracy["r_precision"], "P@1": 100.0 * accuracy["precision_at_1"]}


def attribute_agreement(features: torch.Tensor, attributes: torch.Tensor, k: int = 10) -> float:
    """The mean fraction of a query's attributes that each of its k nearest others shares, in percent."""
    features = F.normalize(features.float(), dim=-1)
    scores = features @ features.T
    scores.fill_diagonal_(float("-inf"))
    top = torch.topk(scores, min(k, len(features) - 1), dim=1).indices
    return 100.0 * (attributes[top] == attributes[:, None]).float().mean().item()


def label_metrics(encoder: Encoder, source: LabelledImages, split: str, batch_size: int = 64, workers: int = 0,
                  progress: bool = True, attributes: bool = False) -> dict[str, float]:
    """Retrieval metrics of a split's images among themselves, labels as relevance; with ``attributes``, also
    the top-10 attribute agreement where the source has attributes."""
    gallery = GalleryDataset(source, split, transform=encoder.transform)
    ids, features = extract_image_features(encoder, gallery, batch_size, workers, progress, desc=f"{split} images")
    numbers = source.label_numbers(split)
    metrics = retrieval_metrics(features, torch.tensor([numbers[i] for i in ids]))
    if attributes and source.attributes:
        metrics["attributes@10"] = attribute_agreement(features, torch.tensor(
            np.stack([source.attributes[i] for i in ids])), k=10)
    return metrics
