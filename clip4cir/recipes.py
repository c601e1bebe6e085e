"""Training recipes: named sets of loss and batching components, so that reproducing the paper and training
better are one flag each (``--recipe clip4cir`` / ``--recipe plus``), and an ablation can switch one component
alone (its own flag overrides the recipe). ``params.json`` records the resolved value of every component.

Components (see clip4cir.losses and clip4cir.loop.EpochSampler):
- ``symmetric``: also let each target retrieve its query (target→query InfoNCE);
- ``learn_temperature``: learn the logit scale instead of fixing it at 100;
- ``label_smoothing``: soften the one-hot targets of the cross-entropy;
- ``hard_negatives``: batches of one category, so in-batch negatives are of the same kind;
- stage two only: ``gallery_negatives``, every training image a negative (cached features make that cheap),
  and ``blend``, fuse the Combiner's and the sum's scores with a weight chosen on validation.
"""
from __future__ import annotations

import argparse

from .cli import number

RECIPES = {
    "clip4cir": {"symmetric": False, "learn_temperature": False, "label_smoothing": 0.0, "hard_negatives": False,
                 "gallery_negatives": False, "blend": False},
    "plus": {"symmetric": True, "learn_temperature": True, "label_smoothing": 0.1, "hard_negatives": True,
             "gallery_negatives": True, "blend": True},
}
DEFAULT_RECIPE = "clip4cir"
STAGE_TWO_ONLY = ("gallery_negatives", "blend")


def add_recipe_args(parser: argparse.ArgumentParser, stage: int) -> None:
    group = parser.add_argument_group("recipe")
    group.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                       help="clip4cir: the paper exactly; plus: this project's recipe (the README's ablation table)")
    flag = argparse.BooleanOptionalAction
    group.add_argument("--symmetric", action=flag, default=None, help="add the target→query loss")
    group.add_argument("--learn-temperature", action=flag, default=None, help="learn the logit scale (from 100)")
    group.add_argument("--label-smoothing", type=number(0, 1, high_open=True), default=None,
                       help="label smoothing of the cross-entropy")
    group.add_argument("--hard-negatives", action=flag, default=None,
                       help="batches of one category (same-kind negatives); data sets without categories ignore it")
    if stage == 2:
        group.add_argument("--gallery-negatives", action=flag, default=None,
                           help="every training image is a negative, not only the batch's targets")
        group.add_argument("--blend", action=flag, default=None,
                           help="fuse Combiner and sum scores, the weight chosen on validation")


def apply_recipe(args: argparse.Namespace, stage: int) -> None:
    """Fill each component the command line left unset from the recipe (in place), and check the values."""
    for name, value in RECIPES[args.recipe].items():
        if stage == 1 and name in STAGE_TWO_ONLY:
            continue
        if getattr(args, name, None) is None:
            setattr(args, name, value)
