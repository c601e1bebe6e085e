"""Frozen-encoder features of the training triplets, computed once and cached on disk.

Holds the image feature of every reference and target image, and the text feature of every caption variant
training samples (FashionIQ's "c1 and c2", "c2 and c1", "c1", "c2"; a single caption). The cache is keyed on
the encoder's fingerprint
(weights and preprocessing) and the triplets' (caption files, split, categories, and the image files' paths,
sizes and modification times), so a changed encoder, caption, image or split never reuses stale features.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from clip4cir.core.fingerprints import digest
from clip4cir.data.datasets import TripletDataset
from clip4cir.data.sources import Source
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.features import cached, encode_texts, extract_image_features


@dataclass
class TripletFeatures:
    """Cached features: ``image[reference[i]]``, ``image[target[i]]``, and ``text[offsets[i] + v]`` for variant v
    (of ``offsets[i + 1] - offsets[i]``) of triplet i."""

    image_ids: list[str]
    image: torch.Tensor  # (n_images, d)
    reference: torch.Tensor  # (n_triplets,) indices into image
    target: torch.Tensor  # (n_triplets,)
    text: torch.Tensor  # (n_variants in all, d)
    offsets: torch.Tensor  # (n_triplets + 1,)

    def __len__(self) -> int:
        return len(self.reference)


class _Images(Dataset):
    def __init__(self, source: Source, ids: Sequence[str], transform):
        self.source, self.ids, self.transform = source, ids, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], self.transform(self.source.load_image(self.ids[i]))


def cache_key(encoder: CLIPEncoder, dataset: TripletDataset) -> str:
    """The encoder's fingerprint and the triplets' (see the module docstring)."""
    return digest(encoder.fingerprint(), dataset.fingerprint(), "variants-v2")


def compute_triplet_features(encoder: CLIPEncoder, dataset: TripletDataset, batch_size: int = 64,
                             workers: int = 0, progress: bool = True) -> TripletFeatures:
    """Encode every image the triplets use and every caption variant, once."""
    image_ids = list(dict.fromkeys(i for t in dataset.triplets for i in (t.reference, t.target)))
    images = _Images(dataset.source, image_ids, encoder.transform)
    _, image = extract_image_features(encoder, images, batch_size, workers, progress, desc="train image features")
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    variants = [t.caption_variants() for t in dataset.triplets]
    text = encode_texts(encoder, [v for vs in variants for v in vs])
    offsets = torch.tensor([0] + [len(vs) for vs in variants]).cumsum(0)
    return TripletFeatures(image_ids, image, torch.tensor([index[t.reference] for t in dataset.triplets]),
                           torch.tensor([index[t.target] for t in dataset.triplets]), text, offsets)


def triplet_features(encoder: CLIPEncoder, dataset: TripletDataset, cache_dir: str | os.PathLike,
                     batch_size: int = 64, workers: int = 0, progress: bool = True) -> tuple[TripletFeatures, bool]:
    """Cached features of the training triplets (computed on a miss, or when the cache file cannot be read);
    returns them and whether the cache hit."""
    key = cache_key(encoder, dataset)
    value, hit = cached(Path(cache_dir) / f"triplets.{key}.pt", key,
                        lambda: vars(compute_triplet_features(encoder, dataset, batch_size, workers, progress)))
    return TripletFeatures(**{k: v for k, v in value.items() if k != "key"}), hit
