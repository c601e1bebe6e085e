"""The project's encoder file: one ``.safetensors`` holding the open_clip ``CLIP`` state dict (or a timm image
encoder's, when ``model_config`` says ``"family": "timm"``), whose metadata describes it, so it loads with
open_clip (or timm) and safetensors alone.

Metadata: ``format`` = ``clip4cir.encoder``, ``version``, ``model_name``, ``model_config`` (JSON, the open_clip
config incl. ``quick_gelu``), ``preprocess`` (JSON, see :class:`clip4cir.transforms.Preprocess`), ``source``
(JSON: how the weights were first obtained), ``fingerprint`` (of the weights and preprocessing) and ``info``
(JSON: e.g. epoch, metrics, and the ``data`` it was trained on).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clip4cir.core.artifacts import atomic_write
from clip4cir.core.errors import ModelError
from clip4cir.models.encoder import CLIPEncoder, Encoder
from clip4cir.models.openai_checkpoint import build_from_config
from clip4cir.models.timm_encoder import TimmEncoder, TimmImageModel
from clip4cir.models.transforms import Preprocess

ENCODER_FORMAT = "clip4cir.encoder"
ENCODER_VERSION = "1"
JSON_FIELDS = ("model_config", "preprocess", "source", "info")


def save_encoder(encoder: Encoder, path: str | os.PathLike, info: dict | None = None) -> None:
    """Save an encoder atomically in the self-describing ``.safetensors`` format (see module docstring)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in encoder.model.state_dict().items()}
    metadata = {"format": ENCODER_FORMAT, "version": ENCODER_VERSION, "model_name": encoder.name,
                "model_config": json.dumps(encoder.config), "preprocess": json.dumps(encoder.preprocess.to_dict()),
                "source": json.dumps(encoder.source), "fingerprint": encoder.fingerprint(),
                "info": json.dumps(info if info is not None else encoder.info)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_encoder_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a saved encoder, parsed; ModelError when the file is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ModelError(f"cannot read encoder file {path}: {e}") from e
    if meta.get("format") != ENCODER_FORMAT:
        raise ModelError(f"{path} is not a clip4cir encoder file (metadata 'format' is {meta.get('format')!r})")
    return {k: (json.loads(v) if k in JSON_FIELDS else v) for k, v in meta.items()}


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> Encoder:
    """Load an encoder saved by :func:`save_encoder` (an open_clip CLIP, or a timm image encoder)."""
    meta = read_encoder_metadata(path)
    image_only = meta["model_config"].get("family") == "timm"
    model = TimmImageModel(meta["model_config"]) if image_only else build_from_config(meta["model_config"])
    try:
        with safe_open(str(path), framework="pt") as f:
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict(state_dict)
    except Exception as e:
        raise ModelError(f"{path}: weights cannot be read or do not match the stored config: {e}") from e
    source = {**meta["source"], "checkpoint": str(Path(path).resolve())}
    cls = TimmEncoder if image_only else CLIPEncoder
    return cls(model.eval(), meta["model_name"], meta["model_config"], Preprocess.from_dict(meta["preprocess"]),
               source, meta["info"]).to(device)
