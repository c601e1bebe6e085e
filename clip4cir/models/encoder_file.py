"""The project's encoder file: one ``.safetensors`` holding the open_clip ``CLIP`` state dict (or a timm image
encoder's, when ``model_config`` says ``"family": "timm"``), whose metadata describes it, so it loads with
open_clip (or timm) and safetensors alone.

Metadata: ``format`` = ``clip4cir.encoder``, ``version``, ``model_name``, ``model_config`` (JSON, the open_clip
config incl. ``quick_gelu``), ``preprocess`` (JSON, see :class:`clip4cir.models.transforms.Preprocess`), ``source``
(JSON: how the weights were first obtained), ``fingerprint`` (of the weights and preprocessing) and ``info``
(JSON: e.g. epoch, metrics, and the ``data`` it was trained on).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clip4cir.core.artifacts import atomic_write
from clip4cir.core.errors import ModelError, shown
from clip4cir.models.encoder import CLIPEncoder, Encoder
from clip4cir.models.openai_checkpoint import build_from_config
from clip4cir.models.timm_encoder import TimmEncoder, TimmImageModel
from clip4cir.models.transforms import Preprocess

ENCODER_FORMAT = "clip4cir.encoder"
ENCODER_VERSION = 1  # written as text: safetensors metadata holds strings (CHANGELOG.md: each bump)
JSON_FIELDS = ("model_config", "preprocess", "source", "info")


def save_encoder(encoder: Encoder, path: str | os.PathLike, info: dict | None = None, half: bool = False) -> None:
    """Save an encoder atomically in the self-describing ``.safetensors`` format (see module docstring); ``half``
    stores its floating-point weights in half precision (half the file: the demo's files stay under the 10 MB a
    Hugging Face Space takes without Git LFS; loading casts them back to the model's precision)."""
    tensors = {k: v.detach().to("cpu", torch.float16 if half and v.is_floating_point() else v.dtype).contiguous()
               for k, v in encoder.model.state_dict().items()}
    metadata = {"format": ENCODER_FORMAT, "version": str(ENCODER_VERSION), "model_name": encoder.name,
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
        raise ModelError(f"{path} is not a clip4cir encoder file (metadata 'format' is {shown(meta.get('format'))})")
    parsed = {}
    for key, value in meta.items():
        try:
            parsed[key] = json.loads(value) if key in JSON_FIELDS else value
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: metadata field {key!r} is not valid JSON ({e})") from None
    for key in ("model_config", "preprocess"):
        if not isinstance(parsed.get(key), dict):
            raise ModelError(f"{path}: metadata field {key!r} is missing or not a JSON object")
    return parsed


def _checked_skeleton(path: str | os.PathLike, build: Callable[[], torch.nn.Module]) -> None:
    """Build the model the metadata describes without memory (on the meta device) and compare its tensor shapes
    with the file's, so that a config that is wrong (e.g. an absurd embed_dim) is a one-line error, not an
    allocation of gigabytes."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    except Exception as e:
        raise ModelError(f"{path}: metadata model_config does not describe a model that can be built: {e}") from None
    with safe_open(str(path), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key in sorted(expected.keys() | stored.keys()):
        if expected.get(key) != stored.get(key):
            raise ModelError(f"{path}: metadata model_config does not match the weights: {key} is "
                             f"{stored.get(key, 'missing')} in the file, {expected.get(key, 'not a weight')} by the "
                             f"config")


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu", record_path: bool = True) -> Encoder:
    """Load an encoder saved by :func:`save_encoder` (an open_clip CLIP, or a timm image encoder); its source
    records ``path`` as where it lives, unless ``record_path`` is False (a run's own checkpoint when resuming,
    which is pruned later: the source stays what the run started from)."""
    meta = read_encoder_metadata(path)
    image_only = meta["model_config"].get("family") == "timm"
    build = (lambda: TimmImageModel(meta["model_config"])) if image_only else (
        lambda: build_from_config(meta["model_config"]))
    _checked_skeleton(path, build)
    model = build()
    try:
        with safe_open(str(path), framework="pt") as f:
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict(state_dict)
    except Exception as e:
        raise ModelError(f"{path}: weights cannot be read or do not match the stored config: {e}") from e
    source = {**meta["source"], "checkpoint": str(Path(path).resolve())} if record_path else meta["source"]
    cls = TimmEncoder if image_only else CLIPEncoder
    return cls(model.eval(), meta["model_name"], meta["model_config"], Preprocess.from_dict(meta["preprocess"]),
               source, meta["info"]).to(device)
