"""Re-ranking (after stage two, optional): train a re-ranker (clip4cir.models.reranker) on the first candidates
that the first stage (the Combiner, or the Sum without one) finds for the training triplets.

The encoder and the first stage are frozen, so the features are computed once and cached (combiner.feature_cache);
each step takes a batch of training triplets (their caption variant of the epoch), finds the first ``depth``
candidates of each query among the training images of its category, puts the target in last place when the first
stage missed it, and trains the re-ranker with the cross-entropy of the target among them (the recipe's logit
scale). Validation ranks the val split with the first stage, then re-ranks.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler

from clip4cir.core.device import eval_mode
from clip4cir.core.errors import ModelError
from clip4cir.evaluation.composed import evaluate
from clip4cir.models.combiner import first_stage_template, load_combiner
from clip4cir.models.factory import load_model
from clip4cir.models.feature_sum import combine_sum
from clip4cir.models.reranker import Reranker, load_reranker, save_reranker
from clip4cir.training.recipes import RecipeConfig
from clip4cir.training.samplers import EpochSampler
from clip4cir.training.stage_one import TripletTask

from .feature_cache import TripletFeatures, triplet_features
from .stage_two import cached_batch

log = logging.getLogger(__name__)


@dataclass
class RerankerConfig(RecipeConfig):
    """The re-ranker's settings: the first stage (``combiner``: its file; None: the Sum), how many candidates
    it re-scores (``depth``), its width and attention heads."""

    combiner: str | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    depth: int = 50
    width: int = 256
    heads: int = 4
    cache_dir: str | None = None


def category_pools(features: TripletFeatures, categories: list[str | None]) -> dict[str | None, torch.Tensor]:
    """Per category, the indices of the training images of that category's triplets (one pool when none)."""
    pools: dict[str | None, set[int]] = {}
    for n, category in enumerate(categories):
        pools.setdefault(category, set()).update((int(features.reference[n]), int(features.target[n])))
    return {category: torch.tensor(sorted(members)) for category, members in pools.items()}


def candidates_with_target(scores: torch.Tensor, pool: torch.Tensor, targets: torch.Tensor, depth: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first-stage scores, image indices, the target's position) of each query's first ``depth`` candidates in
    ``pool`` (``scores``: queries × pool), the target put in last place where the first stage missed it."""
    first, top = torch.topk(scores, min(depth, pool.numel()), dim=1)
    images = pool[top]
    missed = ~(images == targets[:, None]).any(1)
    place = torch.searchsorted(pool, targets)  # the pool is sorted
    images[missed, -1] = targets[missed]
    first[missed, -1] = scores[missed, place[missed]]
    return first, images, (images == targets[:, None]).float().argmax(1)


class RerankerTask(TripletTask):
    """Trains a re-ranker on the first stage's candidates of the training triplets (cached features); validates
    the re-ranked first stage."""

    config: RerankerConfig

    def setup(self, checkpoint: Path | None) -> None:
        c = self.config
        self.encoder = load_model(c.model, c.pretrained, c.clip_checkpoint, c.seed, device=self.device)
        self.encoder.model.eval().requires_grad_(False)
        self.first_stage = load_combiner(c.combiner, self.device, self.encoder)[0] if c.combiner else None
        trained_with = first_stage_template(self.encoder, self.first_stage, "combiner" if c.combiner else "sum")
        if c.source.title_template != trained_with:
            raise ModelError(f"the first stage was trained with title template {trained_with!r}, this run reads "
                             f"{c.source.title_template!r}: give --title-template as the first stage was trained")
        self.prepare_triplets(self.encoder)
        if checkpoint is not None:
            self.reranker = load_reranker(checkpoint / "model.safetensors", self.device, self.encoder)
        else:
            torch.manual_seed(c.seed)  # the same initial re-ranker on every rank
            self.reranker = Reranker(self.encoder.dim, c.width, c.heads, c.depth,
                                     "combiner" if c.combiner else "sum").to(self.device)
        self.reranker.combiner = self.first_stage.fingerprint() if self.first_stage is not None else ""
        self.cache_dir = c.cache_dir or str(Path(c.output) / "feature_cache")

    def combine(self, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The first stage's query (unit length)."""
        combine = self.first_stage.combine if self.first_stage is not None else combine_sum
        return F.normalize(combine(reference, text).float(), dim=-1)

    def training_data(self) -> dict:
        """The triplets, and the first stage: its Combiner's fingerprint (a Combiner changed in place is seen on
        --resume), or the Sum."""
        return {**super().training_data(), "first_stage": self.reranker.combiner or "sum"}

    def module(self) -> nn.Module:
        return self.reranker

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.reranker.parameters())}]

    def batches(self) -> tuple[EpochSampler, Iterable]:
        c, sampler = self.config, self.sampler()
        self.features, hit = triplet_features(self.encoder, self.train_set, self.cache_dir, workers=c.workers,
                                              progress=not c.quiet)
        log.info("training features: %s", "cache hit" if hit else "computed and cached")
        self.images = F.normalize(self.features.image.float(), dim=-1).to(self.device)
        self.pools = category_pools(self.features, [t.category for t in self.train_set.triplets])
        return sampler, BatchSampler(sampler, c.batch_size, drop_last=True)

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        self.reranker.train()

    def loss(self, batch, epoch: int) -> tuple[torch.Tensor, int]:
        c, indices = self.config, torch.tensor(batch)
        reference, text, _ = cached_batch(self.features, indices, c.seed, epoch, c.caption_augmentation)
        reference, text = reference.to(self.device), text.to(self.device)
        with torch.no_grad():
            query = self.combine(reference, text)
        targets = self.features.target[indices]
        categories = [self.train_set.triplets[i].category for i in batch]
        scale, losses = self.temperature(), []
        for category in dict.fromkeys(categories):
            rows = torch.tensor([n for n, name in enumerate(categories) if name == category])
            pool = self.pools[category]
            first, images, label = candidates_with_target(query[rows] @ self.images[pool].T, pool.to(self.device),
                                                          targets[rows].to(self.device), c.depth)
            parts = torch.stack([reference[rows], text[rows], query[rows]], 1)
            scores = self.forward(parts, self.images[images], first)
            losses.append(F.cross_entropy(scale * scores, label, reduction="sum"))
        return torch.stack(losses).sum() / len(batch), len(batch)

    def validate(self) -> dict:
        with eval_mode(self.reranker):
            return evaluate(self.encoder, self.source, combine=self.combine, cache_dir=self.cache_dir,
                            workers=self.config.workers, progress=not self.config.quiet, reranker=self.reranker)

    def write_model(self, path: Path, info: dict) -> None:
        save_reranker(self.reranker, path, self.encoder.record(), {**info, "stage": "reranker"}, self.training_data())

    def weights(self) -> Iterable[torch.Tensor]:
        return self.reranker.parameters()
