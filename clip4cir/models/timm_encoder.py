"""Image-only encoders: a timm backbone (``resnet50``, ``mobilenetv2_100``, ``convnext_tiny``, ...) with a linear
projection head, for learning image similarity from labels (as face- and product-retrieval systems do). They
have no text tower: image search only. Named ``timm/<model>`` wherever an open_clip name is taken."""
from __future__ import annotations

import zlib

import timm
import torch
import torch.nn.functional as F
from torch import nn

from clip4cir.core.errors import ModelError
from clip4cir.models.encoder import Encoder
from clip4cir.models.transforms import Preprocess

PREFIX = "timm/"
DEFAULT_EMBED_DIM = 128


class TimmImageModel(nn.Module):
    """A backbone's pooled features, projected to ``embed_dim``."""

    def __init__(self, config: dict, pretrained: bool = False):
        super().__init__()
        name = config["timm_model"]
        if not timm.is_model(name):
            raise ModelError(f"timm has no model {name!r}")
        try:
            self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0)
        except Exception as e:  # offline, or no weights under that name
            raise ModelError(f"could not load timm's pretrained weights for {name} (offline? put them in timm's "
                             f"cache first): {e}") from e
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features  # after the head
        self.projection = nn.Linear(features, config["embed_dim"])

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.projection(self.backbone(images))
        return F.normalize(features, dim=-1) if normalize else features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


class TimmEncoder(Encoder):
    has_text = False


def is_timm(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def create_timm_encoder(name: str, pretrained: str | None = None, seed: int = 0, embed_dim: int | None = None,
                        preprocess_kind: str = "squarepad", image_size: int | None = None,
                        device: str | torch.device = "cpu") -> TimmEncoder:
    """``timm/<model>`` with timm's pretrained weights (``pretrained`` any tag: the hub's default weights) or a
    seeded random init; the projection head is seeded either way."""
    config = {"family": "timm", "timm_model": name[len(PREFIX):], "embed_dim": embed_dim or DEFAULT_EMBED_DIM}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((zlib.crc32(name.encode()) + seed) % (2 ** 31))
        model = TimmImageModel(config, pretrained=bool(pretrained))
    cfg = model.backbone.pretrained_cfg or {}
    size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    pre = Preprocess(preprocess_kind, size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                     tuple(cfg.get("std", (0.229, 0.224, 0.225))))
    source = {"model": name, "pretrained": pretrained} if pretrained else {"model": name, "seed": seed}
    source["embed_dim"] = config["embed_dim"]
    return TimmEncoder(model.float().eval(), name, config, pre, source).to(device)
