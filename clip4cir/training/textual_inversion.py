"""Zero-shot composed retrieval, trained without triplets: φ (clip4cir.models.pseudo_tokens) learns to turn a
CLIP feature into a pseudo-word token while the encoder stays frozen, by one of two methods (``--method``):

- ``pic2word`` (Pic2Word, SEARLE's φ): from catalog images alone. The text feature of "a photo of $", $ being
  φ(image feature), must retrieve that image among the batch's images (symmetric contrastive loss at the
  encoder's own logit scale).
- ``lincir`` (LinCIR): from texts alone (titles, descriptions). Each text's keyword phrases (runs of content words
  between function words, where LinCIR uses a part-of-speech tagger) are replaced by $, $ being φ of the text's
  own feature with noise of random strength (so that φ also takes image features, which lie elsewhere); the
  result's text feature must be the original's (1 - cosine).

Queries add the Sum query × ``--sum-weight`` (0: φ alone, as the papers query; the two ways of composing miss
different targets, and together find more). Validated on the data set's composed val queries when it has them,
else by how well "a photo of $" finds each val image among the others (inversion R@K). The φ file records its
method, prompt template, Sum weight and encoder.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clip4cir.core.errors import DataError
from clip4cir.core.fingerprints import digest
from clip4cir.core.registry import Registry
from clip4cir.data.datasets import GalleryDataset
from clip4cir.evaluation.composed import evaluate
from clip4cir.evaluation.ranking import recall_at_k, target_ranks
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.factory import load_model
from clip4cir.models.features import encode_texts, extract_image_features
from clip4cir.models.pseudo_tokens import (
    PLACEHOLDER,
    TEMPLATE,
    Phi,
    PseudoTokenQueries,
    encode_with_pseudo_tokens,
    load_phi,
    save_phi,
    token_width,
)
from clip4cir.training.config import RunConfig
from clip4cir.training.losses import contrastive_loss
from clip4cir.training.pairs import initial_scale
from clip4cir.training.samplers import EpochSampler
from clip4cir.training.stage_one import check_batch_fits
from clip4cir.training.trainer import TrainingTask

FUNCTION_WORDS = frozenset(
    "a an the and or but with without of in on at to for from by as that which who whose is are was were be been "
    "has have had it its this these those there here than then very more most less no not so too into onto over "
    "under up down out off about".split())
WORD = re.compile(r"[\w'-]+|[^\w\s]")


def mask_keywords(text: str) -> str:
    """``text`` with each run of content words (keyword phrases) replaced by the placeholder: "red mini dress with
    long sleeves" → "$ with $"; a text with no content word becomes "a photo of $"."""
    out, in_run = [], False
    for word in WORD.findall(text.lower()):
        if word.isalnum() or "-" in word or "'" in word:
            if word in FUNCTION_WORDS:
                out.append(word)
                in_run = False
            elif not in_run:
                out.append(PLACEHOLDER)
                in_run = True
        else:
            out.append(word)
            in_run = False
    masked = " ".join(out)
    return masked if PLACEHOLDER in out else f"a photo of {PLACEHOLDER}"


def training_texts(source) -> list[str]:
    """The distinct texts of the training split's images (what ``lincir`` trains on); DataError when none."""
    texts = sorted({t for texts in source.texts(source.splits()[0]).values() for t in texts})
    if not texts:
        raise DataError(f"--method lincir trains on texts (titles, descriptions): {source.describe()} has no "
                        f"training texts (image-text pairs have them)")
    return texts


@dataclass
class PhiConfig(RunConfig):
    """Training φ's settings (Pic2Word's and LinCIR's: AdamW lr 1e-4, weight decay 0.01, batch 256)."""

    method: str = "pic2word"
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.01
    dropout: float = 0.5
    noise: float = 1.0  # lincir: the noise's largest norm, relative to the (unit) feature's
    template: str = TEMPLATE
    sum_weight: float = 1.5  # queries add the Sum query × this (chosen on dev catalogs: benchmark/zero-shot.md)


class Method:
    """What one way of training φ supplies: its training examples (and their features) and its loss."""

    def examples(self, task: PhiTask) -> tuple[list[str], torch.Tensor]:
        """(example keys, their frozen features): what a batch indexes."""
        raise NotImplementedError

    def loss(self, task: PhiTask, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


METHODS: Registry[Method] = Registry("--method")


@METHODS.register("pic2word")
class Pic2Word(Method):
    """From images: "a photo of $" with $ = φ(image feature) must retrieve the image (Pic2Word, SEARLE's φ)."""

    def examples(self, task: PhiTask) -> tuple[list[str], torch.Tensor]:
        dataset = GalleryDataset(task.source, task.source.splits()[0], transform=task.encoder.transform)
        return extract_image_features(task.encoder, dataset, 128, task.config.workers, not task.config.quiet,
                                      desc="training images")

    def loss(self, task: PhiTask, index: torch.Tensor) -> torch.Tensor:
        images = F.normalize(task.features[index].to(task.device), dim=-1)
        prompts = [f"a photo of {PLACEHOLDER}"] * len(index)
        queries = encode_with_pseudo_tokens(task.encoder, prompts, task.forward(images))
        return contrastive_loss(queries, images, task.scale, symmetric=True)


@METHODS.register("lincir")
class LinCIR(Method):
    """From texts: keyword phrases replaced by $ = φ(noised feature of the text) must give the text's feature."""

    def examples(self, task: PhiTask) -> tuple[list[str], torch.Tensor]:
        texts = training_texts(task.source)
        task.masked = [mask_keywords(t) for t in texts]
        return texts, encode_texts(task.encoder, texts)

    def loss(self, task: PhiTask, index: torch.Tensor) -> torch.Tensor:
        target = F.normalize(task.features[index].to(task.device), dim=-1)
        strength = torch.rand(len(index), 1, device=task.device) * task.config.noise
        noise = torch.randn_like(target) / target.shape[1] ** 0.5  # about unit norm
        pseudo = task.forward(F.normalize(target + strength * noise, dim=-1))
        got = encode_with_pseudo_tokens(task.encoder, [task.masked[i] for i in index.tolist()], pseudo,
                                        normalize=True)
        return (1 - (got * target).sum(-1)).mean()


class PhiTask(TrainingTask):
    """Trains φ with the encoder frozen; validates as the module docstring says; writes the φ file."""

    config: PhiConfig

    def setup(self, checkpoint: Path | None) -> None:
        c = self.config
        self.encoder = load_model(c.model, c.pretrained, c.clip_checkpoint, c.seed, device=self.device)
        if not isinstance(self.encoder, CLIPEncoder):
            raise DataError(f"φ needs an encoder with a text tower; {self.encoder.describe()} has none")
        self.encoder.model.eval().requires_grad_(False)
        self.scale = initial_scale(self.encoder)
        self.method = METHODS[c.method]()
        self.val_features: torch.Tensor | None = None
        self.keys, self.features = self.method.examples(self)
        check_batch_fits(c.batch_size, self.ddp.world_size, len(self.keys), "training examples")
        torch.manual_seed(c.seed)
        self.phi = (load_phi(checkpoint / "model.safetensors", self.encoder, self.device)[0] if checkpoint is not None
                    else Phi(self.encoder.dim, token_width(self.encoder), dropout=c.dropout)).to(self.device)

    def training_data(self) -> dict:
        split = self.source.splits()[0]
        parts = self.source.fingerprint_parts(split)
        return {"train": {"source": self.source.record(), "split": split, "examples": len(self.keys),
                          "fingerprint": digest(parts, self.keys), "parts": parts}}

    def module(self) -> nn.Module:
        return self.phi

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.phi.parameters())}]

    def batches(self) -> tuple[EpochSampler, Iterable]:
        c = self.config
        sampler = EpochSampler(len(self.keys), c.batch_size, c.seed, self.ddp.rank, self.ddp.world_size)
        return sampler, IndexBatches(sampler, c.batch_size)

    def start_epoch(self, epoch: int) -> None:
        self.phi.train()

    def loss(self, batch: torch.Tensor, epoch: int) -> tuple[torch.Tensor, int]:
        return self.method.loss(self, batch), len(batch)

    def validate(self) -> dict:
        self.phi.eval()
        if any(t.target for t in self.source.triplets(self.source.protocol.val_split)):
            queries = PseudoTokenQueries(self.phi, self.encoder, self.config.template, self.config.sum_weight)
            metrics = evaluate(self.encoder, self.source, combine=queries, workers=self.config.workers,
                               progress=not self.config.quiet)
            return {"average": metrics["average"], "score": metrics["score"]}
        if self.val_features is None:  # the encoder is frozen: the val images are encoded once
            split = self.source.protocol.val_split
            self.val_features = extract_image_features(self.encoder, GalleryDataset(
                self.source, split, transform=self.encoder.transform), 128, self.config.workers, False)[1]
        metrics = inversion_recall(self.phi, self.encoder, self.val_features)
        return {"average": metrics, "score": metrics["inversion R@5"]}

    def write_model(self, path: Path, info: dict) -> None:
        save_phi(self.phi, path, self.config.method, self.config.template, self.encoder.record(),
                 {**info, "data": self.training_data()}, self.config.sum_weight)

    def weights(self) -> Iterable[torch.Tensor]:
        return self.phi.parameters()


class IndexBatches:
    """The sampler's indices in batches (the examples' features are in memory: no DataLoader)."""

    def __init__(self, sampler: EpochSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self):
        batch = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield torch.tensor(batch)
                batch = []


@torch.inference_mode()
def inversion_recall(phi: Phi, encoder: CLIPEncoder, image_features: torch.Tensor) -> dict[str, float]:
    """How often "a photo of $" (φ of an image's feature) finds that image among the others: R@1/5/10."""
    images = F.normalize(image_features.float(), dim=-1)
    found = encode_with_pseudo_tokens(encoder, [f"a photo of {PLACEHOLDER}"] * len(images),
                                      phi.eval()(images.to(encoder.device)), normalize=True)
    return recall_at_k(target_ranks(found.float().cpu(), images, torch.arange(len(images))), (1, 5, 10),
                       "inversion R")
