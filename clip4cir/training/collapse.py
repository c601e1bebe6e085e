"""Noticing that metric learning has collapsed: every image mapped to nearly the same embedding, where a margin
loss sits at its margin and learns nothing more. A batch's spread is one minus the mean cosine similarity of its
embeddings (0: all the same). An epoch is collapsed when its loss is at the margin (within ``tolerance``) and its
mean spread below ``min_spread``: a small spread alone is no sign (a small encoder's embeddings often fill a
narrow cone and still rank well, and a loss without a margin, such as proxy-anchor's or SupCon's, never sits at
one). A warning says so, and ``patience`` collapsed epochs in a row stop the run with an error that says what to
change."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from clip4cir.core.distributed import mean_over_ranks
from clip4cir.core.errors import Clip4CirError

log = logging.getLogger(__name__)


class TrainingCollapsed(Clip4CirError):
    """The embeddings stopped telling images apart; the run stopped (the last checkpoint stays)."""


def spread(embeddings: torch.Tensor) -> float:
    """One minus the mean cosine similarity of distinct pairs of a batch's embeddings."""
    x = F.normalize(embeddings.detach().float(), dim=-1)
    n = len(x)
    if n < 2:
        return 1.0
    similarity = (x @ x.T).sum() - n
    return 1.0 - float(similarity) / (n * (n - 1))


class CollapseMonitor:
    """Collects the spread of each step's batch; :meth:`end_epoch` judges the epoch."""

    def __init__(self, margin: float | None, min_spread: float = 0.02, patience: int = 3, tolerance: float = 0.05,
                 hint: str = ""):
        self.margin, self.min_spread, self.patience, self.tolerance, self.hint = (margin, min_spread, patience,
                                                                                  tolerance, hint)
        self.values: list[float] = []
        self.collapsed_epochs = 0

    def step(self, embeddings: torch.Tensor) -> None:
        self.values.append(spread(embeddings))

    def end_epoch(self, epoch: int, loss: float) -> dict:
        """The epoch's mean spread (for its log record); a warning when collapsed, TrainingCollapsed when it has
        been for ``patience`` epochs."""
        mean = mean_over_ranks(sum(self.values) / max(len(self.values), 1))  # every rank judges the same
        self.values = []
        at_margin = self.margin is not None and loss >= (1 - self.tolerance) * self.margin
        self.collapsed_epochs = self.collapsed_epochs + 1 if at_margin and mean < self.min_spread else 0
        if self.collapsed_epochs:
            message = (f"the embeddings collapsed in epoch {epoch + 1}: their spread is {mean:.4f} (1 - mean cosine "
                       f"of a batch; below {self.min_spread}) and the loss {loss:.4f} sits at its margin "
                       f"{self.margin:g}, learning nothing more")
            if self.collapsed_epochs >= self.patience:
                raise TrainingCollapsed(f"{message}, for {self.collapsed_epochs} epochs in a row: the run stopped "
                                        f"(the last checkpoint stays); {self.hint}")
            log.warning("%s; %s", message, self.hint)
        return {"embedding_spread": round(mean, 5)}

    def state_dict(self) -> dict:
        return {"collapsed_epochs": self.collapsed_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.collapsed_epochs = state.get("collapsed_epochs", 0)
