"""The Combiner network of CLIP4Cir (stage two), with the reference's module names so its checkpoints load.

Saved format (``.safetensors``): the state dict, with metadata ``format`` = ``clip4cir.combiner``, ``version``,
``feature_dim``, ``projection_dim``, ``hidden_dim``, ``encoder`` (JSON: the fingerprint and source of the CLIP
encoder whose features it was trained on) and ``info`` (JSON: epoch, metrics).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clip4cir.models import ModelError, atomic_write, eval_mode

COMBINER_FORMAT = "clip4cir.combiner"
COMBINER_VERSION = "1"


class Combiner(nn.Module):
    """Fuses an image and a text feature: a learned residual plus a learned convex mix of the two inputs."""

    def __init__(self, feature_dim: int, projection_dim: int | None = None, hidden_dim: int | None = None,
                 dropout: float = 0.5):
        super().__init__()
        projection_dim = projection_dim or 4 * feature_dim
        hidden_dim = hidden_dim or 8 * feature_dim
        self.feature_dim, self.projection_dim, self.hidden_dim = feature_dim, projection_dim, hidden_dim
        self.text_projection_layer = nn.Linear(feature_dim, projection_dim)
        self.image_projection_layer = nn.Linear(feature_dim, projection_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.combiner_layer = nn.Linear(projection_dim * 2, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, feature_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.dynamic_scalar = nn.Sequential(nn.Linear(projection_dim * 2, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                            nn.Linear(hidden_dim, 1), nn.Sigmoid())
        self.logit_scale = 100

    def combine_features(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The normalised query feature for (not normalised) image and text features."""
        text_projected = self.dropout1(F.relu(self.text_projection_layer(text_features)))
        image_projected = self.dropout2(F.relu(self.image_projection_layer(image_features)))
        raw = torch.cat((text_projected, image_projected), -1)
        combined = self.dropout3(F.relu(self.combiner_layer(raw)))
        mix = self.dynamic_scalar(raw)
        output = self.output_layer(combined) + mix * text_features + (1 - mix) * image_features
        return F.normalize(output, dim=-1)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                target_features: torch.Tensor) -> torch.Tensor:
        """Logits of each query against each target of the batch: 100 · query · normalise(target)ᵀ."""
        query = self.combine_features(image_features, text_features)
        return self.logit_scale * query @ F.normalize(target_features, dim=-1).T

    @torch.inference_mode()
    def combine(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Evaluation-mode combining function (no dropout), with the signature of ``combine_sum``."""
        device = next(self.parameters()).device
        with eval_mode(self):
            return self.combine_features(image_features.to(device).float(), text_features.to(device).float())


def save_combiner(combiner: Combiner, path: str | os.PathLike, encoder: dict | None = None,
                  info: dict | None = None) -> None:
    """Save atomically in the self-describing ``.safetensors`` format."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in combiner.state_dict().items()}
    metadata = {"format": COMBINER_FORMAT, "version": COMBINER_VERSION, "feature_dim": str(combiner.feature_dim),
                "projection_dim": str(combiner.projection_dim), "hidden_dim": str(combiner.hidden_dim),
                "encoder": json.dumps(encoder or {}), "info": json.dumps(info or {})}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_combiner(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Combiner, dict]:
    """Load a Combiner from this project's ``.safetensors`` or CLIP4Cir's ``combiner.pt``
    (``{"epoch", "Combiner": state_dict}``); returns it (eval mode) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"combiner checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ModelError(f"cannot read combiner file {path}: {e}") from e
        if meta.get("format") != COMBINER_FORMAT:
            raise ModelError(f"{path} is not a clip4cir combiner file (metadata 'format' is {meta.get('format')!r})")
        meta = {"encoder": json.loads(meta["encoder"]), "info": json.loads(meta["info"])}
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"cannot read combiner checkpoint {path}: {e}") from e
        state_dict = obj.get("Combiner", obj) if isinstance(obj, dict) else None
        if not isinstance(state_dict, dict) or "text_projection_layer.weight" not in state_dict:
            raise ModelError(f"{path} is not a Combiner checkpoint (expected CLIP4Cir's 'Combiner' state dict)")
        meta = {"encoder": {}, "info": {"epoch": obj.get("epoch")} if "epoch" in obj else {}}
    projection_dim, feature_dim = state_dict["text_projection_layer.weight"].shape
    hidden_dim = state_dict["combiner_layer.weight"].shape[0]
    combiner = Combiner(feature_dim, projection_dim, hidden_dim)
    try:
        combiner.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit a Combiner: {e}") from e
    return combiner.to(device).eval(), meta
