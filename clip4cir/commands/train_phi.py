"""Zero-shot composed retrieval without triplets (``clip4cir train-phi``): train the
textual-inversion network φ for a frozen encoder, from catalog images (``--method pic2word``) or from texts alone
(``--method lincir``) (clip4cir.training.textual_inversion)."""
from __future__ import annotations

from collections.abc import Sequence

from clip4cir.commands.common import check_run_config, config_from_args, number, train, training_parser
from clip4cir.data.sources.base import check_images_readable
from clip4cir.training import textual_inversion
from clip4cir.training.textual_inversion import METHODS, PhiConfig, PhiTask, training_texts


def parse_args(argv: Sequence[str] | None) -> PhiConfig:
    parser = training_parser("clip4cir train-phi", textual_inversion.__doc__, PhiConfig)
    parser.add_argument("--method", choices=METHODS.names(), default="pic2word",
                        help="pic2word: from the catalog's images; lincir: from its texts (titles) alone")
    parser.add_argument("--weight-decay", type=number(0, 1e3), default=0.01)
    parser.add_argument("--dropout", type=number(0, 1, high_open=True), default=0.5, help="φ's dropout")
    parser.add_argument("--noise", type=number(0, 100), default=1.0,
                        help="lincir: the largest noise added to a text feature, relative to its norm")
    parser.add_argument("--sum-weight", type=number(0, 100), default=PhiConfig.sum_weight,
                        help="queries add the Sum query (reference + caption features) × this; 0: φ alone")
    args = parser.parse_args(argv)
    config = config_from_args(PhiConfig, args)
    check_run_config(config)
    source = config.source.open()
    val = source.protocol.val_split
    images = list(source.gallery(val)) + (list(source.gallery(source.splits()[0])) if config.method == "pic2word"
                                          else [])
    if config.method == "lincir":
        training_texts(source)
    check_images_readable(source, images)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    return train(PhiTask, parse_args(argv))
