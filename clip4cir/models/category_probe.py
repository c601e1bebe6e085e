"""Predicting an image's category from its feature (``category="auto"``): a linear probe on gallery features,
as the seed system's SVM step did, trained when the index is built and stored in it."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def train_probe(features: np.ndarray, categories: Sequence[Sequence[str]], steps: int = 300,
                weight_decay: float = 1e-4, seed: int = 0) -> dict | None:
    """Multinomial logistic regression on normalised features (an item counts once for each of its categories);
    None when fewer than two categories exist."""
    labelled = [(i, c) for i, cs in enumerate(categories) for c in cs]
    classes = sorted({c for _, c in labelled})
    if len(classes) < 2:
        return None
    x = F.normalize(torch.as_tensor(features[[i for i, _ in labelled]], dtype=torch.float32), dim=-1)
    y = torch.tensor([classes.index(c) for _, c in labelled])
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(len(classes), x.shape[1], generator=generator)).requires_grad_()
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.1, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(x @ weight.T * 10 + bias, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"classes": classes, "weight": (weight.detach() * 10).tolist(), "bias": bias.detach().tolist()}


def predict_category(probe: dict, features: np.ndarray) -> list[str]:
    """The most likely category of each (raw) feature."""
    x = F.normalize(torch.as_tensor(np.atleast_2d(features), dtype=torch.float32), dim=-1)
    logits = x @ torch.tensor(probe["weight"]).T + torch.tensor(probe["bias"])
    return [probe["classes"][i] for i in logits.argmax(1).tolist()]
