"""The contrastive loss both training stages share, with the components a recipe can switch on.

CLIP4Cir's loss (``--recipe clip4cir``): cross-entropy of 100 · normalised query · normalised targetᵀ over the
(global) batch's targets, each query's own target as the class. Components: a bank of extra negatives (stage two
on cached features can afford the whole training gallery), the symmetric term (each target retrieves its query
among the batch's queries), label smoothing, and a learned scale (``scale`` a tensor with gradients).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clip4cir.core.distributed import gather_with_grad

LOGIT_SCALE = 100.0
MIN_SCALE, MAX_SCALE = 1.0, 1000.0  # a learned scale starts at CLIP4Cir's 100 and may move either way, within these


def contrastive_loss(query: torch.Tensor, target: torch.Tensor, scale: float | torch.Tensor = LOGIT_SCALE,
                     symmetric: bool = False, label_smoothing: float = 0.0, bank: torch.Tensor | None = None,
                     bank_targets: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of a batch. Without a bank, the candidates are the batch's targets (gathered from all ranks under
    torchrun, gradients reaching each rank's own); with one, they are the bank's rows (normalised features,
    without gradients) and ``bank_targets`` gives each query's row. ``symmetric`` averages in the loss of each
    target retrieving its own query among the batch's queries: the query→target logits, transposed."""
    query = F.normalize(query.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    if bank is None:
        candidates, offset = gather_with_grad(target)
        labels = torch.arange(len(query), device=query.device) + offset
    else:
        candidates, labels = F.normalize(bank.float(), dim=-1), bank_targets.to(query.device)
    loss = F.cross_entropy(scale * query @ candidates.T, labels, label_smoothing=label_smoothing)
    if symmetric:
        queries, offset = gather_with_grad(query)
        reverse = scale * target @ queries.T
        labels = torch.arange(len(target), device=target.device) + offset
        loss = (loss + F.cross_entropy(reverse, labels, label_smoothing=label_smoothing)) / 2
    return loss


class Temperature(torch.nn.Module):
    """The logit scale: fixed (CLIP4Cir's 100), or learned (started at ``initial``, trained at its own learning
    rate as CLIP's own training does, and kept within [MIN_SCALE, MAX_SCALE] after every step)."""

    def __init__(self, learned: bool = False, initial: float = LOGIT_SCALE):
        super().__init__()
        self.learned, self.initial = learned, float(min(max(initial, MIN_SCALE), MAX_SCALE))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(self.initial)), requires_grad=learned)

    def forward(self) -> float | torch.Tensor:
        if not self.learned:
            return self.initial
        return self.log_scale.clamp(math.log(MIN_SCALE), math.log(MAX_SCALE)).exp()

    def value(self) -> float:
        """The scale as a number (for logs and files)."""
        return float(torch.as_tensor(self()).detach())

    @torch.no_grad()
    def bound(self) -> None:
        self.log_scale.clamp_(math.log(MIN_SCALE), math.log(MAX_SCALE))
