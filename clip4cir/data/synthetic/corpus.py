"""A pretraining corpus of image-text pairs: product photos with their shop titles (``pairs.jsonl`` over
``images/``), drawn with its own seed from a wider space than the FashionIQ- and CIRR-layout catalogs (more
colours, looser framing and lighting), so that a model pretrained on it meets the catalogs' photos as new ones.
What the shipped base model learned from (clip4cir.commands.make_base_model)."""
from __future__ import annotations

import os
from pathlib import Path

from clip4cir.data.sources.fashioniq import CATEGORIES
from clip4cir.data.synthetic.garments import IMAGE_WIDTH, Catalog, render_all, write_pairs

CORPUS_SEED = 1_000  # the catalogs use small seeds (0, 1, ...): the corpus draws none of their items


def make_pretraining_corpus(out: str | os.PathLike, images: int, seed: int = CORPUS_SEED,
                            workers: int | None = None, width: int = IMAGE_WIDTH) -> dict:
    """Write ``images`` titled photos under ``out`` (categories in turn); the pairs file has no split column, so
    the pairs source holds out a tenth of the images for validation and a tenth for test by their ids."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    catalog = Catalog(seed, wide=True)
    items = [catalog.item(CATEGORIES[n % len(CATEGORIES)]) for n in range(images)]
    render_all([(item, str(out / "images" / f"{item.id}.jpg"), width) for item in items], workers)
    write_pairs(out / "pairs.jsonl", [(item, f"images/{item.id}.jpg", None) for item in items])
    return {"images": len(items), "colours": len(catalog.colours)}
