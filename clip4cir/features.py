"""Batched feature extraction with the CLIP encoders, and an on-disk cache keyed by the encoder's fingerprint."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import GalleryDataset
from .models import CLIPEncoder, amp_dtype, atomic_write, autocast, eval_mode


def _collate(batch):
    """Stack a batch of (id, image) pairs, leaving out items whose image is None (unreadable)."""
    batch = [(image_id, image) for image_id, image in batch if image is not None]
    return [image_id for image_id, _ in batch], torch.stack([image for _, image in batch]) if batch else None


def loader_options(workers: int, device: torch.device) -> dict:
    """DataLoader settings that keep the model fed: worker processes, persistent, pinned memory on CUDA."""
    return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": device.type == "cuda",
            **({"prefetch_factor": 4} if workers > 0 else {})}


@torch.inference_mode()
def extract_image_features(encoder: CLIPEncoder, dataset: Dataset, batch_size: int = 64, workers: int = 0,
                           progress: bool = True, desc: str = "image features") -> tuple[list[str], torch.Tensor]:
    """Features (not normalised, float32, on the CPU) of every ``(id, image tensor)`` item of ``dataset``;
    items whose image is None are left out (the returned ids say which were kept)."""
    device = encoder.device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate,
                        **loader_options(workers, device))
    ids, chunks = [], []
    with eval_mode(encoder.model), autocast(device, amp_dtype(device)):
        for batch_ids, images in tqdm(loader, desc=desc, disable=not progress, leave=False):
            if images is None:
                continue
            chunks.append(encoder.encode_image(images.to(device, non_blocking=True)).float().cpu())
            ids += batch_ids
    return ids, torch.cat(chunks) if chunks else torch.empty(0, encoder.dim)


@torch.inference_mode()
def encode_texts(encoder: CLIPEncoder, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Text features (not normalised, float32, CPU) in input order; batches of similar length pad less."""
    if not texts:
        return torch.empty(0, encoder.dim)
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    out = torch.empty(len(texts), encoder.dim)
    with eval_mode(encoder.model), autocast(encoder.device, amp_dtype(encoder.device)):
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = encoder.encode_text([texts[i] for i in idx]).float().cpu()
    return out


def gallery_features(encoder: CLIPEncoder, root: str | os.PathLike, split: str, category: str,
                     cache_dir: str | os.PathLike | None = None, batch_size: int = 64, workers: int = 0,
                     progress: bool = True) -> tuple[list[str], torch.Tensor]:
    """Features of ``split.<category>.<split>.json``'s images, cached on disk under the encoder's fingerprint."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / encoder.fingerprint() / f"gallery.{category}.{split}.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            return cached["ids"], cached["features"]
    dataset = GalleryDataset(root, split, [category], transform=encoder.transform)
    ids, feats = extract_image_features(encoder, dataset, batch_size, workers, progress,
                                        desc=f"{category} {split} gallery")
    if path is not None:
        atomic_write(path, lambda tmp: torch.save({"ids": ids, "features": feats}, tmp))
    return ids, feats
