"""Learning image similarity from labels: fine-tune an image encoder (an open_clip image tower, or a timm
backbone with a projection head, ``model="timm/resnet50"``) so that images of one label (a person, a product)
are near and others far, with a pytorch-metric-learning loss (clip4cir.training.metric_losses) on batches of m
images of each label. Validated with MAP@R on held-out labels; the encoder file it writes is one the index,
search and app load.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from clip4cir.core.device import autocast
from clip4cir.core.fingerprints import digest
from clip4cir.data.datasets import LabelledImageDataset
from clip4cir.evaluation.labels import label_metrics
from clip4cir.models.encoder import Encoder
from clip4cir.models.encoder_file import load_encoder, save_encoder
from clip4cir.models.factory import load_model
from clip4cir.models.features import loader_options
from clip4cir.training.collapse import CollapseMonitor
from clip4cir.training.config import RunConfig
from clip4cir.training.metric_losses import DEFAULT_LOSS, LOSSES, labelled_loss, make_loss
from clip4cir.training.samplers import ClassBatchSampler
from clip4cir.training.stage_one import set_train_mode, set_trainable
from clip4cir.training.trainer import TrainingTask


@dataclass
class LabelConfig(RunConfig):
    """Learning from labels' settings."""

    epochs: int = 30
    batch_size: int = 64  # m_per_class images of each of batch_size / m_per_class labels
    lr: float | None = None  # None: the loss's own (LOSSES)
    loss: str = DEFAULT_LOSS  # a name of clip4cir.training.metric_losses.LOSSES
    m_per_class: int = 4
    embed_dim: int = 128  # a timm backbone's projection
    weight_decay: float = 1e-4
    proxy_lr_factor: float | None = None  # the proxies' rate (proxy losses) over lr; None: the loss's own

    def __post_init__(self) -> None:
        spec = LOSSES[self.loss]
        self.lr = spec.lr if self.lr is None else self.lr
        self.proxy_lr_factor = spec.proxy_lr_factor if self.proxy_lr_factor is None else self.proxy_lr_factor


class ImageFeatures(nn.Module):
    """images → image features: the module DistributedDataParallel wraps."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.model, self.encoder = encoder.model, encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(images)


class LabelTask(TrainingTask):
    """Trains the image tower on batches of m images per label; validates with MAP@R on the val labels."""

    config: LabelConfig

    def setup(self, checkpoint: Path | None) -> None:
        c = self.config
        if checkpoint is not None:
            self.encoder = load_encoder(checkpoint / "model.safetensors", self.device, record_path=False)
        else:
            self.encoder = load_model(c.model, c.pretrained, c.clip_checkpoint, c.seed, "squarepad",
                                      device=self.device, embed_dim=c.embed_dim)
        self.train_set = LabelledImageDataset(self.source, "train", self.encoder.transform)
        model = self.encoder.model
        self.trainable = set_trainable(model, "image") if self.encoder.has_text else list(model.parameters())
        for p in self.trainable:
            p.requires_grad_(True)
        loss_fn, self.miner = make_loss(c.loss, self.train_set.num_labels, self.encoder.dim)
        self.loss_fn = loss_fn.to(self.device)
        self.collapse = CollapseMonitor(LOSSES[c.loss].margin, hint="try another loss (--loss supcon) or a lower --lr")

    def training_data(self) -> dict:
        parts = self.source.fingerprint_parts("train")
        return {"train": {"source": self.source.record(), "images": len(self.train_set),
                          "labels": self.train_set.num_labels, "fingerprint": digest(parts), "parts": parts},
                "skipped_labels": self.source.skipped_labels}

    def module(self) -> nn.Module:
        return ImageFeatures(self.encoder)

    def parameter_groups(self) -> list[dict]:
        groups = [{"params": self.trainable}]
        if list(self.loss_fn.parameters()):  # proxies
            groups.append({"params": list(self.loss_fn.parameters()),
                           "lr": self.config.lr * self.config.proxy_lr_factor, "weight_decay": 0.0})
        return groups

    def state_modules(self) -> dict[str, nn.Module]:
        return {"loss": self.loss_fn, "collapse": self.collapse}

    def batches(self) -> tuple[ClassBatchSampler, Iterable]:
        c = self.config
        sampler = ClassBatchSampler(self.train_set.labels, c.m_per_class, c.batch_size, c.seed, self.ddp.rank,
                                    self.ddp.world_size)
        loader = DataLoader(self.train_set, batch_size=c.batch_size, sampler=sampler, drop_last=True,
                            **loader_options(c.workers, self.device, c.seed))
        return sampler, loader

    def start_epoch(self, epoch: int) -> None:
        if self.encoder.has_text:
            set_train_mode(self.encoder.model, "image")
        else:
            self.encoder.model.train()

    def loss(self, batch: dict, epoch: int) -> tuple[torch.Tensor, int]:
        images, labels = batch["image"].to(self.device, non_blocking=True), batch["label"].to(self.device)
        with autocast(self.device, self.amp_dtype):
            embeddings = self.forward(images)
        self.collapse.step(embeddings)
        return labelled_loss(self.loss_fn, self.miner, embeddings, labels), len(labels)

    def end_epoch(self, epoch: int, loss: float) -> dict:
        return self.collapse.end_epoch(epoch, loss)

    def after_step(self) -> None:
        self.encoder.invalidate_fingerprint()

    def validate(self) -> dict:
        self.encoder.model.eval()
        metrics = label_metrics(self.encoder, self.source, "val", workers=self.config.workers,
                                progress=not self.config.quiet)
        return {"average": metrics, "score": metrics["MAP@R"]}

    def write_model(self, path: Path, info: dict) -> None:
        save_encoder(self.encoder, path, {**info, "stage": "labels", "loss": self.config.loss,
                                          "data": self.training_data()})

    def weights(self) -> Iterable[torch.Tensor]:
        return self.encoder.model.parameters()
