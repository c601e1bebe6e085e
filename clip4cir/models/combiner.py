"""Combining a reference image feature and a caption feature into one query: CLIP4Cir's Sum, and its Combiner
network (stage two), with the reference's module names so CLIP4Cir's ``combiner.pt`` loads unchanged; or, without
triplets, a pseudo-word token of the reference in the caption's prompt (clip4cir.models.pseudo_tokens).

The Combiner's file (``.safetensors``): its state dict, with metadata ``format`` = ``clip4cir.combiner``,
``version``, ``feature_dim``, ``projection_dim``, ``hidden_dim``, ``encoder`` (JSON: the fingerprint and source of
the CLIP encoder whose features it was trained on), ``data`` (JSON: what it was trained on), ``blend`` (the weight
of its scores against the sum's, chosen on validation; 1 when not blended) and ``info`` (JSON: epoch, metrics).
Loading it for an encoder checks the fingerprint: features of another encoder are refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from clip4cir.core.artifacts import atomic_write, input_file
from clip4cir.core.errors import ModelError
from clip4cir.data.captions import trained_title_template
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.feature_sum import combine_sum
from clip4cir.models.features import encode_texts
from clip4cir.models.pseudo_tokens import zero_shot_queries
from clip4cir.models.tensor_files import read_tensor_file

COMBINER_FORMAT = "clip4cir.combiner"
COMBINER_VERSION = 1  # written as text: safetensors metadata holds strings (CHANGELOG.md: each bump)
log = logging.getLogger(__name__)
Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Combiner(nn.Module):
    """Fuses an image and a text feature: a learned residual plus a learned convex mix of the two inputs."""

    def __init__(self, feature_dim: int, projection_dim: int | None = None, hidden_dim: int | None = None,
                 dropout: float = 0.5):
        super().__init__()
        projection_dim = projection_dim or 4 * feature_dim
        hidden_dim = hidden_dim or 8 * feature_dim
        for name, value in (("feature_dim", feature_dim), ("projection_dim", projection_dim),
                            ("hidden_dim", hidden_dim)):
            if value < 1:
                raise ModelError(f"Combiner {name} must be at least 1, got {value}")
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
        self.trained_on: dict = {}  # the record of the encoder whose features it was trained on (when known)
        self.path: str | None = None  # the file it was loaded from
        self.blend = 1.0  # the weight of the Combiner's query against the sum's (1: the Combiner alone)
        self.title_template: str | None = None  # the frame of its training captions (title-aware), when one

    def check_fits(self, encoder: CLIPEncoder) -> None:
        """ModelError, naming both files, unless this Combiner was trained on ``encoder``'s features (a Combiner
        of unknown origin, e.g. CLIP4Cir's ``combiner.pt``, is only checked for the feature size)."""
        name = f"combiner {self.path}" if self.path else "the Combiner"
        encoder_file = encoder.source.get("checkpoint") or encoder.describe()
        trained_on = self.trained_on.get("fingerprint")
        if trained_on and trained_on != encoder.fingerprint():
            raise ModelError(f"{name} was trained on features of encoder {self.trained_on.get('description', '?')} "
                             f"(fingerprint {trained_on}), not of {encoder_file} (fingerprint "
                             f"{encoder.fingerprint()}): give the encoder it was trained with, or train a Combiner "
                             f"for this one")
        if self.feature_dim != encoder.dim:
            raise ModelError(f"{name} takes {self.feature_dim}-d features; {encoder_file} gives {encoder.dim}-d")
        if not trained_on:
            log.warning("%s does not record the encoder it was trained on (a CLIP4Cir combiner.pt?): only its "
                        "feature size (%d) could be checked against %s", name, self.feature_dim, encoder_file)

    def fingerprint(self) -> str:
        """A hash of the weights (and the blend): what a re-ranker trained on this Combiner's candidates records."""
        h = hashlib.sha256(str(self.blend).encode())
        for name, tensor in self.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def _fuse(self, image_features: torch.Tensor, text_features: torch.Tensor, dropout: bool) -> torch.Tensor:
        p = self.dropout1.p

        def drop(x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x, p, training=dropout)

        text_projected = drop(F.relu(self.text_projection_layer(text_features)))
        image_projected = drop(F.relu(self.image_projection_layer(image_features)))
        raw = torch.cat((text_projected, image_projected), -1)
        combined = drop(F.relu(self.combiner_layer(raw)))
        scalar = self.dynamic_scalar
        mix = torch.sigmoid(scalar[3](drop(F.relu(scalar[0](raw)))))
        output = self.output_layer(combined) + mix * text_features + (1 - mix) * image_features
        return F.normalize(output, dim=-1)

    def combine_features(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The normalised query feature (training: dropout as the module's mode says)."""
        return self._fuse(image_features, text_features, dropout=self.training)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                target_features: torch.Tensor) -> torch.Tensor:
        """Logits of each query against each target of the batch: 100 · query · normalise(target)ᵀ."""
        query = self.combine_features(image_features, text_features)
        return self.logit_scale * query @ F.normalize(target_features, dim=-1).T

    @torch.inference_mode()
    def combine(self, image_features: torch.Tensor, text_features: torch.Tensor,
                blend: float | None = None) -> torch.Tensor:
        """The evaluation-mode combining function (never dropout, whatever the mode, and without switching it:
        safe while other threads use the module), with the signature of ``combine_sum``. With a blend weight w
        below 1 (its own, or ``blend``) the query is w · its query + (1 − w) · the sum's: ranking by it ranks
        by the same blend of the two scores."""
        device = next(self.parameters()).device
        image_features, text_features = image_features.to(device).float(), text_features.to(device).float()
        query = self._fuse(image_features, text_features, dropout=False)
        weight = self.blend if blend is None else blend
        return query if weight == 1 else weight * query + (1 - weight) * combine_sum(image_features, text_features)


def save_combiner(combiner: Combiner, path: str | os.PathLike, encoder: dict | None = None,
                  info: dict | None = None, data: dict | None = None) -> None:
    """Save atomically in the self-describing ``.safetensors`` format."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in combiner.state_dict().items()}
    metadata = {"format": COMBINER_FORMAT, "version": str(COMBINER_VERSION), "feature_dim": str(combiner.feature_dim),
                "projection_dim": str(combiner.projection_dim), "hidden_dim": str(combiner.hidden_dim),
                "blend": str(combiner.blend), "encoder": json.dumps(encoder or {}), "data": json.dumps(data or {}),
                "info": json.dumps(info or {})}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _read_combiner(path: Path) -> tuple[dict, dict]:
    if path.suffix == ".safetensors":
        state_dict, meta = read_tensor_file(path, COMBINER_FORMAT, "combiner")
        return state_dict, {**{k: json.loads(meta.get(k, "{}")) for k in ("encoder", "data", "info")},
                            "blend": float(meta.get("blend", 1))}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot read combiner checkpoint {path}: {e}") from e
    state_dict = obj.get("Combiner", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict) or "text_projection_layer.weight" not in state_dict:
        raise ModelError(f"{path} is not a Combiner checkpoint (expected CLIP4Cir's 'Combiner' state dict)")
    return state_dict, {"encoder": {}, "data": {}, "blend": 1.0,
                        "info": {"epoch": obj.get("epoch")} if "epoch" in obj else {}}


def load_combiner(path: str | os.PathLike, device: str | torch.device = "cpu",
                  encoder: CLIPEncoder | None = None) -> tuple[Combiner, dict]:
    """Load a Combiner from this project's ``.safetensors`` or CLIP4Cir's ``combiner.pt`` (``{"epoch",
    "Combiner": state_dict}``); returns it in evaluation mode and its metadata. With ``encoder``, a Combiner
    trained on another encoder's features (or of another feature size) is refused, naming both files."""
    path = input_file(path, "combiner checkpoint", ModelError)
    state_dict, meta = _read_combiner(path)
    projection_dim, feature_dim = state_dict["text_projection_layer.weight"].shape
    hidden_dim = state_dict["combiner_layer.weight"].shape[0]
    combiner = Combiner(feature_dim, projection_dim, hidden_dim)
    try:
        combiner.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit a Combiner: {e}") from e
    combiner.trained_on, combiner.path, combiner.blend = meta["encoder"], str(path), meta["blend"]
    combiner.title_template = trained_title_template(meta["data"])
    if encoder is not None:
        combiner.check_fits(encoder)
    return combiner.to(device).eval(), meta


def first_stage_template(encoder: CLIPEncoder, combiner: Combiner | None, mode: str) -> str | None:
    """The title template the way ``mode`` composes was trained with: the Combiner's, the encoder's for the Sum,
    none for φ (None: captions alone)."""
    if mode == "combiner":
        return combiner.title_template if combiner is not None else None
    return trained_title_template(encoder.info.get("data", {})) if mode == "sum" else None


def combining_function(encoder: CLIPEncoder, combiner_path: str | None, mode: str,
                       phi_path: str | None = None, sum_weight: float | None = None) -> Combine:
    """``sum``; the Combiner at ``combiner_path``; or (``phi``) the textual inversion at ``phi_path`` (with the Sum
    query × ``sum_weight`` added; default: the weight in its file): each checked to have been trained on this
    encoder's features."""
    if mode == "sum":
        return combine_sum
    if mode == "phi":
        if not phi_path:
            raise ModelError("--mode phi needs --phi PATH (a φ trained by clip4cir train-phi)")
        return zero_shot_queries(phi_path, encoder, sum_weight)
    if not combiner_path:
        raise ModelError("--mode combiner needs --combiner PATH (a stage-two checkpoint)")
    return load_combiner(combiner_path, encoder.device, encoder)[0].combine


@torch.inference_mode()
def compose_queries(encoder: CLIPEncoder, combine: Combine, reference_features: torch.Tensor,
                    captions: Sequence[str]) -> torch.Tensor:
    """The composed queries of reference features and captions: a function of image and text features (Sum, the
    Combiner) gets the captions' text features; one that reads captions (``reads_captions``: textual inversion)
    gets the captions themselves."""
    reference = reference_features.to(encoder.device)
    if getattr(combine, "reads_captions", False):
        return combine(reference, captions)
    return combine(reference, encode_texts(encoder, captions).to(encoder.device))
