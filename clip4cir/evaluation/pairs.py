"""Image-text retrieval on held-out pairs, as CLIP is evaluated: each text retrieves its image among the split's
images (text→image), each image retrieves its texts among the split's texts (image→text: the best-ranked of its
own texts counts). Recall@1/5/10 in percent."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clip4cir.data.datasets import GalleryDataset
from clip4cir.data.sources import Source
from clip4cir.evaluation.ranking import recall_at_k, target_ranks
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.features import encode_texts, extract_image_features

PAIR_KS = (1, 5, 10)


def pair_ranks(image_features: torch.Tensor, text_features: torch.Tensor, image_of_text: torch.Tensor,
               chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(0-based rank of each text's image among the images, 0-based rank of each image's best own text among the
    texts), by cosine similarity, ties to the lower index, images taken ``chunk_size`` at a time.
    ``image_of_text[j]`` is the image of text j; every image has at least one text."""
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    text_to_image = target_ranks(texts, images, image_of_text)
    positions = torch.arange(len(texts))
    image_to_text = torch.empty(len(images), dtype=torch.long)
    for start in range(0, len(images), chunk_size):  # each image's own texts, then how many beat the best one
        scores = images[start:start + chunk_size] @ texts.T
        own = image_of_text[None, :] == torch.arange(start, start + len(scores))[:, None]
        best = scores.masked_fill(~own, float("-inf")).max(1).values[:, None]
        first_best = torch.where(own & (scores == best), positions, len(texts)).min(1).values[:, None]
        image_to_text[start:start + len(scores)] = ((scores > best) | ((scores == best) & (positions < first_best))
                                                    ).sum(1)
    return text_to_image, image_to_text


def pair_recalls(image_features: torch.Tensor, text_features: torch.Tensor, image_of_text: torch.Tensor,
                 ks: Sequence[int] = PAIR_KS) -> dict[str, float]:
    """Text→image and image→text Recall@K of :func:`pair_ranks`."""
    text_to_image, image_to_text = pair_ranks(image_features, text_features, image_of_text)
    return {**recall_at_k(text_to_image, ks, "text→image R"), **recall_at_k(image_to_text, ks, "image→text R")}


def pair_metrics(encoder: CLIPEncoder, source: Source, split: str, batch_size: int = 64, workers: int = 0,
                 progress: bool = True) -> dict[str, float]:
    """Text→image and image→text Recall@1/5/10 on a split's image-text pairs, with the pair counts."""
    texts = source.texts(split)
    dataset = GalleryDataset(source, split, transform=encoder.transform)
    ids, image_features = extract_image_features(encoder, dataset, batch_size, workers, progress,
                                                 desc=f"{split} images")
    position = {image_id: n for n, image_id in enumerate(ids)}
    flat = [(position[i], text) for i in ids for text in texts[i]]
    text_features = encode_texts(encoder, [text for _, text in flat])
    metrics = pair_recalls(image_features, text_features, torch.tensor([n for n, _ in flat]))
    return {**metrics, "images": len(ids), "texts": len(flat)}
