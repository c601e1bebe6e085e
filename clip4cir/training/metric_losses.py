"""The losses of learning similarity from labels, from pytorch-metric-learning: a registry of each loss (with its
miner, if it uses one, and the learning rates it trains well at), so that adding a loss is one entry.

``supcon``: supervised contrastive; ``triplet``: triplet margin loss on the batch-hard triplets (each anchor's
farthest positive and nearest negative), which can pull every embedding together on hard data;
``triplet-semihard``: on the semi-hard triplets (negatives farther than the positive, within the margin);
``triplet-random``: one random triplet per anchor (the plain baseline); ``proxy-anchor`` and
``normalized-softmax``: one learned proxy per label, trained at ``proxy_lr_factor`` times the encoder's rate.
Batches hold ``m`` images of each of ``batch_size / m`` labels (clip4cir.training.samplers.ClassBatchSampler), so
every anchor has positives. The rates are those the labels benchmark chose on validation labels
(``python scripts/benchmark.py labels``: benchmark/labels.md).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pytorch_metric_learning import losses, miners

from clip4cir.core.registry import Registry

MARGIN = 0.1


@dataclass(frozen=True)
class MetricLoss:
    """A loss: how it is made for (labels, dimension) — the loss and its miner — and its learning rates."""

    make: Callable[[int, int], tuple[torch.nn.Module, torch.nn.Module | None]]
    lr: float
    proxy_lr_factor: float = 1.0  # the proxies' rate over the encoder's (proxy losses)
    margin: float | None = None  # where a margin loss sits when it has collapsed (clip4cir.training.collapse)


LOSSES: Registry[MetricLoss] = Registry("--loss")
LOSSES.add("supcon", MetricLoss(lambda n, d: (losses.SupConLoss(temperature=0.1), None), lr=3e-4))
LOSSES.add("triplet", MetricLoss(lambda n, d: (losses.TripletMarginLoss(margin=MARGIN), miners.BatchHardMiner()),
                                 lr=3e-4, margin=MARGIN))
LOSSES.add("triplet-semihard", MetricLoss(lambda n, d: (losses.TripletMarginLoss(margin=MARGIN),
                                                        miners.TripletMarginMiner(margin=MARGIN,
                                                                                  type_of_triplets="semihard")),
                                          lr=3e-4, margin=MARGIN))
LOSSES.add("triplet-random", MetricLoss(lambda n, d: (losses.TripletMarginLoss(margin=MARGIN, triplets_per_anchor=1),
                                                      None), lr=3e-4, margin=MARGIN))
LOSSES.add("proxy-anchor", MetricLoss(lambda n, d: (losses.ProxyAnchorLoss(n, d, margin=MARGIN, alpha=32), None),
                                      lr=3e-4, proxy_lr_factor=10.0))
LOSSES.add("normalized-softmax", MetricLoss(lambda n, d: (losses.NormalizedSoftmaxLoss(n, d, temperature=0.05), None),
                                            lr=3e-4, proxy_lr_factor=10.0))
DEFAULT_LOSS = "supcon"


def make_loss(name: str, num_classes: int, dim: int) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The loss (with its learned proxies, if any) and the miner it uses."""
    return LOSSES[name].make(num_classes, dim)


def labelled_loss(loss: torch.nn.Module, miner: torch.nn.Module | None, embeddings: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """The loss of a batch of embeddings, mined first where the loss uses a miner."""
    embeddings = embeddings.float()
    return loss(embeddings, labels, miner(embeddings, labels)) if miner is not None else loss(embeddings, labels)
