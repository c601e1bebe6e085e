"""Use a published φ (``scripts/import_phi.py``, ``clip4cir-import-phi``): SEARLE's textual-inversion network
(ICCV 2023, CC BY-NC 4.0: non-commercial use; this project ships none and downloads none) from a file you give,
checked against the encoder it was trained for and written as this project's φ file (fingerprinted to that
encoder), for ``--phi`` in evaluate, search and the app.

SEARLE's φ read raw CLIP image features; this project searches with unit ones, so the φ file records the mean
feature norm of the encoder on up to ``--norm-images`` images of ``--data`` (your catalog) and scales by it.

    python scripts/import_phi.py --searle SEARLE_ViT-B32.pt --model ViT-B-32 --pretrained openai \\
        --data shop/pairs.jsonl --output phi-searle.safetensors
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import torch

from clip4cir.commands.common import add_model_args, add_source_args, encoder_from_args, run, source_options, whole
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.pseudo_tokens import TEMPLATE, published_phi, read_searle_phi, save_phi

log = logging.getLogger(__name__)
SEARLE_LICENCE = "CC BY-NC 4.0"


@torch.inference_mode()
def mean_feature_norm(encoder: CLIPEncoder, source, n: int) -> float:
    """The mean norm of the encoder's raw image features over the first ``n`` images of the source's splits."""
    ids = sorted({i for split in source.splits() for i in source.gallery(split)})[:n]
    norms = []
    for start in range(0, len(ids), 32):
        images = torch.stack([encoder.transform(source.load_image(i)) for i in ids[start:start + 32]])
        norms.append(encoder.encode_image(images.to(encoder.device)).float().norm(dim=-1).cpu())
    return float(torch.cat(norms).mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--searle", required=True, help="SEARLE's φ file (SEARLE_ViT-B32.pt or SEARLE_ViT-L14.pt)")
    parser.add_argument("--output", required=True, help="the φ file to write (.safetensors)")
    parser.add_argument("--norm-images", type=whole(1), default=256,
                        help="images of --data that measure the encoder's feature norm")
    add_model_args(parser)
    add_source_args(parser)
    args = parser.parse_args(argv)
    state = read_searle_phi(args.searle)  # before any model loads: a wrong file fails at once
    source = source_options(args).open()
    encoder = encoder_from_args(args)
    phi = published_phi(state, encoder, 1.0)
    phi.input_scale = mean_feature_norm(encoder, source, args.norm_images)
    save_phi(phi, args.output, "searle", TEMPLATE, encoder.record(),
             {"source": Path(args.searle).name, "licence": SEARLE_LICENCE, "norm_images": args.norm_images})
    log.info("wrote %s: SEARLE's φ (%s) for %s, features scaled by %.3f", args.output, SEARLE_LICENCE,
             encoder.describe(), phi.input_scale)
    return 0


def console() -> int:
    return run(main)
