"""The order a trainer sees its samples in: pure functions of (seed, epoch), resumable mid-epoch, and split into
global batches that each process takes its slice of, so N processes at batch b train like one at batch N·b.

- :class:`EpochSampler`: a seeded permutation; with ``groups`` (a label per sample, e.g. its category) batches
  of one group, so in-batch negatives are of the same kind. Every sample is seen once an epoch either way: a
  group's leftovers (fewer than a batch) are pooled into mixed batches, so both orders train the same number of
  steps.
- :class:`ClassBatchSampler`: pytorch-metric-learning's m-per-class sampler (learning from labels).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from pytorch_metric_learning import samplers
from pytorch_metric_learning.utils import common_functions
from torch.utils.data import Sampler

from clip4cir.core.errors import DataError


class ResumableSampler(Sampler[int]):
    """The part every trainer's sampler shares: the epoch, the batches to skip after a resume, this process's
    slice of each global batch."""

    def __init__(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.skip_batches = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches_per_epoch(self) -> int:
        raise NotImplementedError

    def global_batches(self) -> torch.Tensor:
        """The epoch's global batches, (batches, global batch) sample indices."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        mine = self.global_batches().view(-1, self.world_size, self.batch_size)[self.skip_batches:, self.rank]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip_batches) * self.batch_size


class EpochSampler(ResumableSampler):
    """A seeded permutation per epoch (the same on every run, resume and world size), cut into global batches;
    with ``groups``, batches of one group first, then the groups' leftovers together."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 groups: Sequence | None = None):
        super().__init__(batch_size, seed, rank, world_size)
        self.n = n
        self.groups = None
        if groups is not None:
            labels = {g: i for i, g in enumerate(sorted(set(groups), key=str))}
            self.groups = torch.tensor([labels[g] for g in groups])

    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch  # grouped or not: every sample once, the last partial batch dropped

    def global_batches(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator)
        size = self.global_batch
        if self.groups is None:
            return order[: self.batches_per_epoch() * size].view(-1, size)
        whole, leftovers = [], []
        for label in range(int(self.groups.max()) + 1):
            members = order[self.groups[order] == label]
            full = len(members) // size * size
            whole.append(members[:full].view(-1, size))
            leftovers.append(members[full:])
        pooled = torch.cat(leftovers)
        pooled = pooled[torch.randperm(len(pooled), generator=generator)]
        mixed = pooled[: len(pooled) // size * size].view(-1, size)
        batches = torch.cat(whole + [mixed])
        return batches[torch.randperm(len(batches), generator=generator)]


class ClassBatchSampler(ResumableSampler):
    """pytorch-metric-learning's m-per-class sampler, made resumable and distributed: an epoch's order is a pure
    function of (seed, epoch)."""

    def __init__(self, labels: Sequence[int], m: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        super().__init__(batch_size, seed, rank, world_size)
        self.labels, self.m = list(labels), m
        if self.global_batch % m:
            raise DataError(f"the batch ({self.global_batch}) must be a multiple of --m-per-class ({m})")
        if self.global_batch // m > len(set(self.labels)):
            raise DataError(f"a batch of {self.global_batch} needs {self.global_batch // m} labels of {m} images; "
                            f"the training split has {len(set(self.labels))} labels")
        self._sampler = samplers.MPerClassSampler(self.labels, m, self.global_batch, len(self.labels))
        self._label_order = list(self._sampler.labels)  # the sampler shuffles its list in place; restored per epoch

    def batches_per_epoch(self) -> int:
        return len(self._sampler) // self.global_batch

    def global_batches(self) -> torch.Tensor:
        saved = common_functions.NUMPY_RANDOM
        common_functions.NUMPY_RANDOM = np.random.RandomState([self.seed, self.epoch])
        self._sampler.labels = list(self._label_order)
        try:
            order = torch.tensor(list(iter(self._sampler)))
        finally:
            common_functions.NUMPY_RANDOM = saved
        return order[: self.batches_per_epoch() * self.global_batch].view(-1, self.global_batch)
