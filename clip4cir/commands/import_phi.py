"""Use a published φ (``clip4cir import-phi``): SEARLE's textual-inversion network
(ICCV 2023, CC BY-NC 4.0: non-commercial use; this project ships none and downloads none) from a file you give,
checked against the encoder it was trained for and written as this project's φ file (fingerprinted to that
encoder, reading raw image features as SEARLE does), for ``--phi`` in evaluate, search and the app.

    python -m clip4cir import-phi --searle SEARLE_ViT-L14.pt --model ViT-L-14 --pretrained openai \\
        --output phi-searle.safetensors
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from clip4cir.commands.common import add_model_args, encoder_from_args, number
from clip4cir.models.pseudo_tokens import TEMPLATE, check_published_phi, read_searle_phi, save_phi

log = logging.getLogger(__name__)
SEARLE_LICENCE = "CC BY-NC 4.0"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip4cir import-phi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--searle", required=True, help="SEARLE's φ file (SEARLE_ViT-B32.pt or SEARLE_ViT-L14.pt)")
    parser.add_argument("--output", required=True, help="the φ file to write (.safetensors)")
    parser.add_argument("--any-encoder", action="store_true",
                        help="accept an encoder SEARLE did not train for (a fine-tuned CLIP, another tag): φ then "
                             "reads features it never saw, at your risk")
    parser.add_argument("--sum-weight", type=number(0, 100), default=0.0,
                        help="queries add the Sum query × this (default 0: φ alone, as SEARLE published it)")
    add_model_args(parser)
    args = parser.parse_args(argv)
    phi = read_searle_phi(args.searle)  # before the model loads: a wrong file fails at once
    encoder = encoder_from_args(args)
    check_published_phi(phi, encoder, args.any_encoder)
    save_phi(phi, args.output, "searle", TEMPLATE, encoder.record(),
             {"source": Path(args.searle).name, "licence": SEARLE_LICENCE}, args.sum_weight)
    log.info("wrote %s: SEARLE's φ (%s) for %s", args.output, SEARLE_LICENCE, encoder.describe())
    return 0
