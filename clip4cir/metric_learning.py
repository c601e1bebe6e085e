"""Learning similarity from labels, with pytorch-metric-learning's losses, miner and sampler, and its metrics.

Losses (``--loss``): ``triplet`` (triplet margin loss on the batch-hard triplets: each anchor's farthest
positive and nearest negative), ``triplet-random`` (one random triplet per anchor: the plain baseline),
``supcon`` (supervised contrastive), ``proxy-anchor`` and ``normalized-softmax`` (one learned proxy per label).
Batches hold ``m`` images of each of ``batch_size / m`` labels, so every anchor has positives.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, samplers
from pytorch_metric_learning.utils import common_functions
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from torch.utils.data import Sampler

LOSSES = ("triplet", "triplet-random", "supcon", "proxy-anchor", "normalized-softmax")
RECALL_KS = (1, 2, 4, 8)


def make_loss(name: str, num_classes: int, dim: int) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The loss (with its learned proxies, if any) and the miner it uses."""
    if name == "triplet":
        return losses.TripletMarginLoss(margin=0.1), miners.BatchHardMiner()
    if name == "triplet-random":
        return losses.TripletMarginLoss(margin=0.1, triplets_per_anchor=1), None
    if name == "supcon":
        return losses.SupConLoss(temperature=0.1), None
    if name == "proxy-anchor":
        return losses.ProxyAnchorLoss(num_classes, dim, margin=0.1, alpha=32), None
    if name == "normalized-softmax":
        return losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=0.05), None
    raise ValueError(f"unknown --loss {name!r}; choose from {', '.join(LOSSES)}")


def labelled_loss(loss: torch.nn.Module, miner: torch.nn.Module | None, embeddings: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """The loss of a batch of embeddings, mined first where the loss uses a miner."""
    embeddings = embeddings.float()
    return loss(embeddings, labels, miner(embeddings, labels)) if miner is not None else loss(embeddings, labels)


class ClassBatchSampler(Sampler[int]):
    """pytorch-metric-learning's m-per-class sampler, made resumable and distributed like the other trainers'
    sampler: an epoch's order is a pure function of (seed, epoch); batches done before an interruption are
    skipped; each process takes its slice of every global batch."""

    def __init__(self, labels: Sequence[int], m: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.labels, self.m, self.batch_size, self.seed = list(labels), m, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip_batches = 0, 0
        global_batch = batch_size * world_size
        if global_batch % m:
            raise ValueError(f"the batch ({global_batch}) must be a multiple of --m-per-class ({m})")
        if global_batch // m > len(set(self.labels)):
            raise ValueError(f"a batch of {global_batch} needs {global_batch // m} labels of {m} images; the "
                             f"training split has {len(set(self.labels))} labels")
        self._sampler = samplers.MPerClassSampler(self.labels, m, global_batch, len(self.labels))
        self._label_order = list(self._sampler.labels)  # the sampler shuffles its list in place; restored per epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches_per_epoch(self) -> int:
        return len(self._sampler) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[int]:
        saved = common_functions.NUMPY_RANDOM
        common_functions.NUMPY_RANDOM = np.random.RandomState([self.seed, self.epoch])
        self._sampler.labels = list(self._label_order)
        try:
            order = torch.tensor(list(iter(self._sampler)))
        finally:
            common_functions.NUMPY_RANDOM = saved
        order = order[: self.batches_per_epoch() * self.batch_size * self.world_size]
        mine = order.view(-1, self.world_size, self.batch_size)[self.skip_batches:, self.rank]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip_batches) * self.batch_size


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
    """The mean fraction of a query's attributes that each of its k nearest others shares, in percent (the
    top-k attribute agreement of face retrieval)."""
    features = F.normalize(features.float(), dim=-1)
    scores = features @ features.T
    scores.fill_diagonal_(float("-inf"))
    top = torch.topk(scores, min(k, len(features) - 1), dim=1).indices
    return 100.0 * (attributes[top] == attributes[:, None]).float().mean().item()
