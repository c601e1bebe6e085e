"""Image preprocessing: CLIP4Cir's ``targetpad`` and ``squarepad``, and open_clip's own transform.

Every transform first converts the image to RGB (RGBA, palette, greyscale, CMYK ... all work).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms as T

from clip4cir.data.images import to_rgb

PREPROCESS_KINDS = ("targetpad", "squarepad", "openclip")


@dataclass(frozen=True)
class Preprocess:
    """Everything that decides how an image becomes a tensor; stored with checkpoints and indexes."""

    kind: str = "targetpad"
    size: int = 224
    mean: tuple[float, ...] = field(default=tuple(OPENAI_DATASET_MEAN))
    std: tuple[float, ...] = field(default=tuple(OPENAI_DATASET_STD))
    target_ratio: float = 1.25

    def __post_init__(self):
        if self.kind not in PREPROCESS_KINDS:
            raise ValueError(f"unknown preprocessing {self.kind!r}; choose from {', '.join(PREPROCESS_KINDS)}")
        if self.target_ratio < 1:
            raise ValueError(f"target_ratio must be >= 1, got {self.target_ratio}")

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(kind=d["kind"], size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   target_ratio=float(d.get("target_ratio", 1.25)))


def target_pad(image: Image.Image, target_ratio: float) -> Image.Image:
    """Pad to ``target_ratio`` only when the aspect ratio exceeds it (CLIP4Cir's TargetPad)."""
    w, h = image.size
    if max(w, h) / min(w, h) < target_ratio:
        return image
    scaled_max_wh = max(w, h) / target_ratio
    hp = max(int((scaled_max_wh - w) / 2), 0)
    vp = max(int((scaled_max_wh - h) / 2), 0)
    return TF.pad(image, [hp, vp, hp, vp], 0, "constant")


def square_pad(image: Image.Image) -> Image.Image:
    """Pad the short side so the image is square (CLIP4Cir's SquarePad)."""
    w, h = image.size
    max_wh = max(w, h)
    hp, vp = int((max_wh - w) / 2), int((max_wh - h) / 2)
    return TF.pad(image, [hp, vp, hp, vp], 0, "constant")


def build_transform(pre: Preprocess) -> Callable[[Image.Image], torch.Tensor]:  # noqa: F821
    """The image → tensor transform ``pre`` describes."""
    if pre.kind == "openclip":
        clip_transform = image_transform_v2(PreprocessCfg(size=pre.size, mean=pre.mean, std=pre.std), is_train=False)
        return T.Compose([to_rgb, clip_transform])
    pad = partial(target_pad, target_ratio=pre.target_ratio) if pre.kind == "targetpad" else square_pad
    return T.Compose([
        to_rgb,
        pad,
        T.Resize(pre.size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(pre.size),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])
