"""Image-text training on a catalog's own pairs (an image and its title or description): CLIP's symmetric
contrastive loss, each image retrieving its text among the (global) batch's texts and each text its image, with
the model's own learned logit scale. For a shop this is catalog adaptation: a CLIP that knows its words ("midi",
"A-line", its brands) before any triplet exists; the encoder file it writes is one stage one, the index, search
and app load. Validated by text→image and image→text Recall@1/5/10 on held-out pairs.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from clip4cir.core.device import autocast
from clip4cir.data.datasets import PairDataset
from clip4cir.evaluation.pairs import pair_metrics
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.encoder_file import load_encoder, save_encoder
from clip4cir.models.factory import load_model
from clip4cir.models.features import loader_options
from clip4cir.training.config import RunConfig
from clip4cir.training.losses import LOGIT_SCALE, Temperature, contrastive_loss
from clip4cir.training.samplers import EpochSampler
from clip4cir.training.stage_one import TowerFeatures, check_batch_fits, set_train_mode, set_trainable
from clip4cir.training.trainer import TrainingTask

SCORE = ("text→image R@10", "image→text R@10")  # the headline: their mean


@dataclass
class PairsConfig(RunConfig):
    """Image-text training's settings (a pretrained CLIP is adapted at a small rate; a random init needs ~1e-3)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-5
    encoder: str = "both"
    weight_decay: float = 0.1
    learn_temperature: bool = True
    temperature_lr: float = 1e-3
    preprocess: str = "targetpad"
    target_ratio: float = 1.25


def initial_scale(encoder: CLIPEncoder) -> float:
    """The model's own logit scale (CLIP's learned one; 1/0.07 at a random init), else CLIP4Cir's 100."""
    scale = getattr(encoder.model, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else LOGIT_SCALE


class PairsTask(TrainingTask):
    """Trains the towers ``config.encoder`` names on the training pairs (a text of each image drawn per epoch);
    validates with pair retrieval on the data set's validation split; writes the encoder file."""

    config: PairsConfig

    def setup(self, checkpoint: Path | None) -> None:
        c = self.config
        if checkpoint is not None:
            self.encoder = load_encoder(checkpoint / "model.safetensors", self.device, record_path=False)
        else:
            self.encoder = load_model(c.model, c.pretrained, c.clip_checkpoint, c.seed, c.preprocess, c.target_ratio,
                                      self.device)
        if not isinstance(self.encoder, CLIPEncoder):
            raise ValueError(f"image-text training needs an encoder with a text tower; {self.encoder.describe()} has "
                             f"none")
        self.train_set = PairDataset(self.source, "train", self.encoder.transform, c.seed)
        check_batch_fits(c.batch_size, self.ddp.world_size, len(self.train_set), "training images")
        self.trainable = set_trainable(self.encoder.model, c.encoder)
        self.temperature = Temperature(c.learn_temperature, initial_scale(self.encoder)).to(self.device)

    def training_data(self) -> dict:
        return {"train": self.train_set.record()}

    def module(self) -> nn.Module:
        return TowerFeatures(self.encoder, self.config.encoder)

    def parameter_groups(self) -> list[dict]:
        return [{"params": self.trainable}]

    def batches(self) -> tuple[EpochSampler, Iterable]:
        c = self.config
        sampler = EpochSampler(len(self.train_set), c.batch_size, c.seed, self.ddp.rank, self.ddp.world_size)
        loader = DataLoader(self.train_set, batch_size=c.batch_size, sampler=sampler, drop_last=True,
                            **loader_options(c.workers, self.device, c.seed))
        return sampler, loader

    def start_epoch(self, epoch: int) -> None:
        self.train_set.set_epoch(epoch)
        set_train_mode(self.encoder.model, self.config.encoder)

    def loss(self, batch: dict, epoch: int) -> tuple[torch.Tensor, int]:
        texts = [self.train_set.text(i) for i in batch["index"].tolist()]
        images = batch["image"].to(self.device, non_blocking=True)
        tokens = self.encoder.tokenize(texts).to(self.device)
        with autocast(self.device, self.amp_dtype):
            image_features, text_features = self.forward(images, tokens)
        return contrastive_loss(image_features, text_features, self.temperature(), symmetric=True), len(texts)

    def after_step(self) -> None:
        self.encoder.invalidate_fingerprint()

    def validate(self) -> dict:
        self.encoder.model.eval()
        metrics = pair_metrics(self.encoder, self.source, self.source.protocol.val_split, workers=self.config.workers,
                               progress=not self.config.quiet)
        return {"average": metrics, "score": sum(metrics[k] for k in SCORE) / len(SCORE)}

    def write_model(self, path: Path, info: dict) -> None:
        scale = getattr(self.encoder.model, "logit_scale", None)
        if isinstance(scale, torch.Tensor) and self.temperature.learned:  # the model keeps what it learned, as CLIP
            with torch.no_grad():
                scale.fill_(math.log(self.temperature.value()))
            self.encoder.invalidate_fingerprint()
        save_encoder(self.encoder, path, {**info, "stage": "pairs", "encoder": self.config.encoder,
                                          "logit_scale": self.temperature.value(), "data": self.training_data()})

    def weights(self) -> Iterable[torch.Tensor]:
        return self.encoder.model.parameters()
