"""The losses of learning similarity from labels, from pytorch-metric-learning: a registry of each loss (with its
miner, if it uses one), so that adding a loss is one entry.

``triplet``: triplet margin loss on the batch-hard triplets (each anchor's farthest positive and nearest
negative); ``triplet-random``: one random triplet per anchor (the plain baseline); ``supcon``: supervised
contrastive; ``proxy-anchor`` and ``normalized-softmax``: one learned proxy per label. Batches hold ``m``
images of each of ``batch_size / m`` labels (clip4cir.training.samplers.ClassBatchSampler), so every anchor has
positives.
"""
from __future__ import annotations

from typing import Callable

import torch
from pytorch_metric_learning import losses, miners

from clip4cir.core.registry import Registry

MakeLoss = Callable[[int, int], tuple[torch.nn.Module, torch.nn.Module | None]]  # (labels, dim) -> (loss, miner)
LOSSES: Registry[MakeLoss] = Registry("--loss")
LOSSES.add("triplet", lambda n, d: (losses.TripletMarginLoss(margin=0.1), miners.BatchHardMiner()))
LOSSES.add("triplet-random", lambda n, d: (losses.TripletMarginLoss(margin=0.1, triplets_per_anchor=1), None))
LOSSES.add("supcon", lambda n, d: (losses.SupConLoss(temperature=0.1), None))
LOSSES.add("proxy-anchor", lambda n, d: (losses.ProxyAnchorLoss(n, d, margin=0.1, alpha=32), None))
LOSSES.add("normalized-softmax", lambda n, d: (losses.NormalizedSoftmaxLoss(n, d, temperature=0.05), None))


def make_loss(name: str, num_classes: int, dim: int) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The loss (with its learned proxies, if any) and the miner it uses."""
    return LOSSES[name](num_classes, dim)


def labelled_loss(loss: torch.nn.Module, miner: torch.nn.Module | None, embeddings: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """The loss of a batch of embeddings, mined first where the loss uses a miner."""
    embeddings = embeddings.float()
    return loss(embeddings, labels, miner(embeddings, labels)) if miner is not None else loss(embeddings, labels)
