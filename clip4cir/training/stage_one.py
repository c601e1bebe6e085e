"""Stage one: task-oriented fine-tuning of the CLIP image and/or text encoder.

Query = normalise(image feature of the reference + text feature of the caption), target = normalise(image
feature of the target), logits = 100 · query · targetᵀ over the (global) batch, cross-entropy against the diagonal
(``recipe="clip4cir"``); the recipe's components (clip4cir.training.recipes) change the loss and the batches.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from clip4cir.core.device import autocast
from clip4cir.data.datasets import TripletDataset
from clip4cir.evaluation.composed import evaluate
from clip4cir.models.encoder import CLIPEncoder, Encoder
from clip4cir.models.encoder_file import load_encoder, save_encoder
from clip4cir.models.factory import load_model
from clip4cir.models.features import loader_options
from clip4cir.training.losses import LOGIT_SCALE, Temperature, contrastive_loss
from clip4cir.training.recipes import RecipeConfig
from clip4cir.training.samplers import EpochSampler
from clip4cir.training.trainer import TrainingTask

ENCODER_CHOICES = ("both", "image", "text")
log = logging.getLogger(__name__)


@dataclass
class StageOneConfig(RecipeConfig):
    """Stage one's settings (the reference's defaults: AdamW lr 2e-6, batch 128, targetpad 1.25)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 2e-6
    encoder: str = "both"
    weight_decay: float = 0.01
    grad_checkpointing: bool = False
    preprocess: str = "targetpad"
    target_ratio: float = 1.25


def set_trainable(model: nn.Module, encoder: str) -> list[nn.Parameter]:
    """Unfreeze the towers ``encoder`` names (both/image/text), freeze the rest; returns the trainable params."""
    if encoder not in ENCODER_CHOICES:
        raise ValueError(f"--encoder must be one of {', '.join(ENCODER_CHOICES)}, got {encoder!r}")
    trainable = []
    for name, p in model.named_parameters():
        visual = name.startswith("visual.")
        text = not visual and not name.startswith("logit_")  # the fixed scale of 100 replaces logit_scale
        p.requires_grad_((visual and encoder in ("both", "image")) or (text and encoder in ("both", "text")))
        if p.requires_grad:
            trainable.append(p)
    return trainable


def set_train_mode(model: nn.Module, encoder: str) -> None:
    """Train mode for the trained towers; frozen towers and every BatchNorm layer stay in eval mode."""
    model.train()
    if encoder == "text":
        model.visual.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class TowerFeatures(nn.Module):
    """(images, tokens) → (image features, text features), with gradients only through the trained towers:
    the module DistributedDataParallel wraps."""

    def __init__(self, encoder: CLIPEncoder, towers: str):
        super().__init__()
        self.model, self.encoder, self.towers = encoder.model, encoder, towers

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.towers != "text"):
            image_features = self.encoder.encode_image(images)
        with torch.set_grad_enabled(grad and self.towers != "image"):
            text_features = self.encoder.encode_text(tokens)
        return image_features, text_features


def training_step(features: nn.Module, encoder: CLIPEncoder, batch: dict, captions: list[str],
                  dtype: torch.dtype | None, scale: float | torch.Tensor = LOGIT_SCALE, symmetric: bool = False,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss of one batch; ``features`` is a TowerFeatures, wrapped in DistributedDataParallel under torchrun."""
    device = encoder.device
    images = torch.cat([batch["reference"], batch["target"]]).to(device, non_blocking=True)
    tokens = encoder.tokenize(captions).to(device)
    with autocast(device, dtype):
        image_features, text_features = features(images, tokens)
    reference, target = image_features.float().chunk(2)
    return contrastive_loss(reference + text_features.float(), target, scale, symmetric, label_smoothing)


def batch_groups(train_set: TripletDataset, hard_negatives: bool) -> list | None:
    """The category of each training triplet, for batches of one category (None: random batches)."""
    categories = [t.category for t in train_set.triplets]
    return categories if hard_negatives and all(categories) and len(set(categories)) > 1 else None


def check_batch_fits(batch_size: int, world_size: int, n: int, what: str = "training triplets") -> None:
    """One global batch (batch size × processes) must fit in the training data."""
    if batch_size * world_size > n:
        where = f" × {world_size} processes" if world_size > 1 else ""
        raise ValueError(f"--batch-size {batch_size}{where} is larger than the {n:,} {what}")


def training_triplets(source, encoder: Encoder, config: RecipeConfig, world_size: int) -> TripletDataset:
    """The training triplets, their captions randomised with caption augmentation (empty ones skipped and
    counted), checked to hold a batch."""
    train_set = TripletDataset(source, "train", transform=encoder.transform,
                               randomize_captions=config.caption_augmentation,
                               seed=config.seed, skip_empty_captions=True)
    check_batch_fits(config.batch_size, world_size, len(train_set))
    return train_set


class TripletTask(TrainingTask):
    """What both composed-retrieval stages share: the training triplets (captions randomised with caption
    augmentation), the logit scale of the recipe, batches of one category with hard negatives, the caption draw
    of each epoch."""

    config: RecipeConfig

    def prepare_triplets(self, encoder: Encoder) -> None:
        self.train_set = training_triplets(self.source, encoder, self.config, self.ddp.world_size)
        self.temperature = Temperature(self.config.learn_temperature).to(self.device)
        if self.ddp.is_main and self.train_set.empty_captions:
            log.info("training on %s triplets; skipped %s with an empty caption", f"{len(self.train_set):,}",
                     f"{self.train_set.empty_captions:,}")

    def training_data(self) -> dict:
        return {"train": self.train_set.record(), "skipped_empty_captions": self.train_set.empty_captions}

    def sampler(self) -> EpochSampler:
        c = self.config
        return EpochSampler(len(self.train_set), c.batch_size, c.seed, self.ddp.rank, self.ddp.world_size,
                            batch_groups(self.train_set, c.hard_negatives))

    def start_epoch(self, epoch: int) -> None:
        self.train_set.set_epoch(epoch)


class StageOneTask(TripletTask):
    """Fine-tunes the towers ``config.encoder`` names on the training triplets; validates with the data set's
    protocol; writes the encoder file."""

    config: StageOneConfig

    def setup(self, checkpoint: Path | None) -> None:
        c = self.config
        if checkpoint is not None:
            self.encoder = load_encoder(checkpoint / "model.safetensors", self.device, record_path=False)
        else:
            self.encoder = load_model(c.model, c.pretrained, c.clip_checkpoint, c.seed, c.preprocess, c.target_ratio,
                                      self.device)
        self.prepare_triplets(self.encoder)
        self.trainable = set_trainable(self.encoder.model, c.encoder)
        if c.grad_checkpointing:
            self.encoder.model.set_grad_checkpointing(True)

    def module(self) -> nn.Module:
        return TowerFeatures(self.encoder, self.config.encoder)

    def parameter_groups(self) -> list[dict]:
        return [{"params": self.trainable}]

    def batches(self) -> tuple[EpochSampler, Iterable]:
        c, sampler = self.config, self.sampler()
        loader = DataLoader(self.train_set, batch_size=c.batch_size, sampler=sampler, drop_last=True,
                            **loader_options(c.workers, self.device, c.seed))
        return sampler, loader

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        set_train_mode(self.encoder.model, self.config.encoder)

    def loss(self, batch: dict, epoch: int) -> tuple[torch.Tensor, int]:
        captions = [self.train_set.caption(i) for i in batch["index"].tolist()]
        loss = training_step(self.forward, self.encoder, batch, captions, self.amp_dtype, self.temperature(),
                             self.config.symmetric, self.config.label_smoothing)
        return loss, len(captions)

    def after_step(self) -> None:
        self.encoder.invalidate_fingerprint()

    def validate(self) -> dict:
        self.encoder.model.eval()
        return evaluate(self.encoder, self.source, workers=self.config.workers, progress=not self.config.quiet)

    def write_model(self, path: Path, info: dict) -> None:
        save_encoder(self.encoder, path, {**info, "stage": "clip-finetune", "encoder": self.config.encoder,
                                          "data": self.training_data()})

    def weights(self) -> Iterable[torch.Tensor]:
        return self.encoder.model.parameters()
