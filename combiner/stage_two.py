"""Stage two: train the Combiner (clip4cir.models.combiner) on features of frozen CLIP encoders.

The encoders are frozen, so their features are computed once and cached (``combiner.feature_cache``); epochs
then run on the cached tensors. ``reencode`` instead encodes every batch as the reference implementation does
(for comparison: same data order, captions and loss).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader

from clip4cir.core.device import autocast, eval_mode
from clip4cir.core.distributed import barrier
from clip4cir.data.captions import random_caption_variant
from clip4cir.evaluation.composed import choose_blend, evaluate
from clip4cir.models.combiner import Combiner, load_combiner, save_combiner
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.factory import load_model
from clip4cir.models.features import loader_options
from clip4cir.training.losses import contrastive_loss
from clip4cir.training.recipes import RecipeConfig
from clip4cir.training.samplers import EpochSampler
from clip4cir.training.stage_one import TripletTask

from .feature_cache import TripletFeatures, triplet_features

log = logging.getLogger(__name__)


@dataclass
class StageTwoConfig(RecipeConfig):
    """Stage two's settings (the reference's: Adam lr 2e-5 on large batches)."""

    stage: ClassVar[int] = 2
    epochs: int = 300
    batch_size: int = 1024
    lr: float = 2e-5
    proj_dim: int | None = None
    hidden_dim: int | None = None
    cache_dir: str | None = None
    reencode: bool = False
    gallery_negatives: bool | None = None
    blend: bool | None = None


def cached_batch(features: TripletFeatures, indices: torch.Tensor, seed: int, epoch: int, randomize: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reference image, caption text, target image) features of a batch of triplets, from the cache; the
    epoch's caption variant with caption augmentation (``randomize``), else the evaluation caption."""
    counts = (features.offsets[1:] - features.offsets[:-1])[indices]
    variants = torch.tensor([random_caption_variant(seed, epoch, i, int(n)) if randomize else 0
                             for i, n in zip(indices.tolist(), counts, strict=True)])
    return (features.image[features.reference[indices]], features.text[features.offsets[indices] + variants],
            features.image[features.target[indices]])


@torch.no_grad()
def encoded_batch(encoder: CLIPEncoder, batch: dict, captions: list[str]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same features, encoded now from the batch's images and captions (the reference's way)."""
    images = torch.cat([batch["reference"], batch["target"]]).to(encoder.device, non_blocking=True)
    reference, target = encoder.encode_image(images).float().chunk(2)
    return reference, encoder.encode_text(captions).float(), target


class CombinedQuery(nn.Module):
    """(reference image features, text features) → the Combiner's query: the module DistributedDataParallel wraps."""

    def __init__(self, combiner: Combiner):
        super().__init__()
        self.combiner = combiner

    def forward(self, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.combiner.combine_features(reference, text)


def combiner_loss(query_model: nn.Module, reference: torch.Tensor, text: torch.Tensor, target: torch.Tensor,
                  amp_dtype: torch.dtype | None, **loss_options) -> torch.Tensor:
    """Contrastive loss of the combined query against the (global) batch's targets, or against a bank of
    negatives (see clip4cir.training.losses.contrastive_loss for the options)."""
    device = next(query_model.parameters()).device
    with autocast(device, amp_dtype):
        query = query_model(reference.to(device), text.to(device))
    return contrastive_loss(query, target.to(device), **loss_options)


class StageTwoTask(TripletTask):
    """Trains a Combiner on the frozen encoder's features of the training triplets (cached, or re-encoded per
    batch); validates the Combiner (or its blend with the sum, chosen on validation)."""

    config: StageTwoConfig

    def setup(self, checkpoint: Path | None) -> None:
        c = self.config
        self.encoder = load_model(c.model, c.pretrained, c.clip_checkpoint, c.seed, device=self.device)
        self.encoder.model.eval().requires_grad_(False)
        self.prepare_triplets(self.encoder)
        if checkpoint is not None:
            self.combiner = load_combiner(checkpoint / "model.safetensors", self.device, self.encoder)[0]
        else:
            torch.manual_seed(c.seed)  # the same initial Combiner on every rank
            self.combiner = Combiner(self.encoder.dim, c.proj_dim, c.hidden_dim).to(self.device)
        self.cache_dir = c.cache_dir or str(Path(c.output) / "feature_cache")

    def module(self) -> nn.Module:
        return CombinedQuery(self.combiner)

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.combiner.parameters())}]

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.Adam(groups, lr=self.config.lr)

    def batches(self) -> tuple[EpochSampler, Iterable]:
        c, ddp, sampler = self.config, self.ddp, self.sampler()
        if c.reencode:
            return sampler, DataLoader(self.train_set, batch_size=c.batch_size, sampler=sampler, drop_last=True,
                                       **loader_options(c.workers, self.device, c.seed))
        started = time.perf_counter()
        if ddp.is_main:  # the main rank fills the cache, the others then read it
            self.features, hit = triplet_features(self.encoder, self.train_set, self.cache_dir, workers=c.workers,
                                                  progress=not c.quiet)
        barrier()
        if not ddp.is_main:
            self.features, hit = triplet_features(self.encoder, self.train_set, self.cache_dir, progress=False)
        if ddp.is_main:
            log.info("training features: %s in %.1fs (%s triplets, %s images)",
                     "cache hit" if hit else "computed and cached", time.perf_counter() - started,
                     f"{len(self.features):,}", f"{len(self.features.image_ids):,}")
        return sampler, BatchSampler(sampler, c.batch_size, drop_last=True)

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        self.combiner.train()

    def loss(self, batch, epoch: int) -> tuple[torch.Tensor, int]:
        c = self.config
        if c.reencode:
            captions = [self.train_set.caption(i) for i in batch["index"].tolist()]
            reference, text, target = encoded_batch(self.encoder, batch, captions)
        else:
            reference, text, target = cached_batch(self.features, torch.tensor(batch), c.seed, epoch,
                                                   c.caption_augmentation)
        bank = {"bank": self.features.image, "bank_targets": self.features.target[torch.tensor(batch)]} \
            if c.gallery_negatives else {}
        loss = combiner_loss(self.forward, reference, text, target, self.amp_dtype, scale=self.temperature(),
                             symmetric=c.symmetric, label_smoothing=c.label_smoothing, **bank)
        return loss, len(reference)

    def validate(self) -> dict:
        c = self.config
        with eval_mode(self.combiner):
            if not c.blend:
                return evaluate(self.encoder, self.source, combine=self.combiner.combine, cache_dir=self.cache_dir,
                                workers=c.workers, progress=not c.quiet)
            self.combiner.blend, metrics = choose_blend(self.encoder, self.source, self.combiner,
                                                        cache_dir=self.cache_dir, workers=c.workers,
                                                        progress=not c.quiet)
            return {**metrics, "blend": self.combiner.blend}

    def write_model(self, path: Path, info: dict) -> None:
        save_combiner(self.combiner, path, self.encoder.record(), {**info, "stage": "combiner"},
                      self.training_data())

    def weights(self) -> Iterable[torch.Tensor]:
        return self.combiner.parameters()
