"""CLIP4Cir's Sum combining function, the baseline every composed query is measured against (and one part of the
zero-shot φ + Sum query, clip4cir.models.pseudo_tokens)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def combine_sum(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP4Cir's Sum combining function: normalise(image feature + text feature)."""
    return F.normalize(image_features + text_features, dim=-1)
