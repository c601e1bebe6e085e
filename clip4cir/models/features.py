"""Batched feature extraction with the CLIP encoders, and on-disk feature caches keyed by what the features were
computed from (the encoder's fingerprint and the data's), so a changed encoder, image or split is never served
from a stale cache."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clip4cir.core.artifacts import atomic_write
from clip4cir.core.device import amp_dtype, autocast, eval_mode
from clip4cir.core.errors import NonFiniteError
from clip4cir.core.fingerprints import digest
from clip4cir.data.datasets import GalleryDataset
from clip4cir.data.sources import Source
from clip4cir.models.encoder import CLIPEncoder, Encoder


def _collate(batch):
    """Stack a batch of (id, image) pairs, leaving out items whose image is None (unreadable)."""
    batch = [(image_id, image) for image_id, image in batch if image is not None]
    return [image_id for image_id, _ in batch], torch.stack([image for _, image in batch]) if batch else None


def loader_options(workers: int, device: torch.device, seed: int = 0) -> dict:
    """DataLoader settings that keep the model fed (worker processes, persistent, pinned memory on CUDA) and draw
    worker seeds from their own generator: creating a loader never consumes the global random state, so results
    do not depend on whether a cache was warm."""
    return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": device.type == "cuda",
            "generator": torch.Generator().manual_seed(seed), **({"prefetch_factor": 4} if workers > 0 else {})}


def check_finite(features: torch.Tensor, what: str) -> torch.Tensor:
    """NonFiniteError when any feature is NaN or infinite (a broken model gives no result, not a wrong one)."""
    bad = ~torch.isfinite(features).all(dim=-1) if features.ndim > 1 else ~torch.isfinite(features)
    if bad.any():
        raise NonFiniteError(f"{int(bad.sum()):,} of {len(features):,} {what} are NaN or infinite: the model is "
                             f"broken (diverged training?); no result is computed from them")
    return features


@torch.inference_mode()
def extract_image_features(encoder: Encoder, dataset: Dataset, batch_size: int = 64, workers: int = 0,
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
    features = torch.cat(chunks) if chunks else torch.empty(0, encoder.dim)
    return ids, check_finite(features, f"{desc} of {encoder.describe()}")


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
    return check_finite(out, f"caption features of {encoder.describe()}")


def cached(path: Path | None, key: str, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``compute()``'s dict of tensors, cached in the file ``path`` together with ``key`` (what it was computed
    from); returns it and whether the cache hit. An unreadable cache file or one with another key is recomputed
    (with a warning naming it) and replaced atomically."""
    if path is not None and path.is_file():
        try:
            value = torch.load(path, weights_only=True)
            if isinstance(value, dict) and value.get("key") == key:
                return value, True
            reason = "it was computed from other inputs"
        except Exception as e:  # truncated, corrupt, foreign: a cache is derived data, compute it again
            reason = f"it cannot be read ({type(e).__name__}: {e})"
        warnings.warn(f"feature cache {path}: {reason}; computing the features again", stacklevel=2)
    value = {**compute(), "key": key}
    if path is not None:
        atomic_write(path, lambda tmp: torch.save(value, tmp))
    return value, False


def gallery_features(encoder: Encoder, source: Source, split: str, category: str | None = None,
                     cache_dir: str | os.PathLike | None = None, batch_size: int = 64, workers: int = 0,
                     progress: bool = True) -> tuple[list[str], torch.Tensor]:
    """Features of a split's gallery (of one category, when given), cached on disk under a key of the encoder's
    fingerprint, the annotation files and the images."""
    dataset = GalleryDataset(source, split, [category] if category else None, transform=encoder.transform)
    key = digest(encoder.fingerprint(), dataset.fingerprint())
    name = f"{category or 'all'}.{split}"
    path = Path(cache_dir) / f"gallery.{name}.{key}.pt" if cache_dir is not None else None

    def compute() -> dict:
        ids, features = extract_image_features(encoder, dataset, batch_size, workers, progress,
                                               desc=f"{category or ''} {split} gallery".strip())
        return {"ids": ids, "features": features}

    value, _ = cached(path, key, compute)
    return value["ids"], check_finite(value["features"], f"{name} gallery features")
