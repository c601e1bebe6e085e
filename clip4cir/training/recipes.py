"""Training recipes: named sets of loss and batching components, so that reproducing the paper and training
better are one choice each (``--recipe clip4cir`` / ``--recipe plus``), and an ablation can switch one component
alone (its own setting overrides the recipe). ``params.json`` records the resolved value of every component.

Components (see clip4cir.training.losses and clip4cir.training.samplers.EpochSampler):
- ``symmetric``: also let each target retrieve its query (target→query InfoNCE);
- ``learn_temperature``: learn the logit scale (at its own learning rate) instead of fixing it at 100;
- ``label_smoothing``: soften the one-hot targets of the cross-entropy;
- ``hard_negatives``: batches of one category, so in-batch negatives are of the same kind;
- ``caption_augmentation``: the paper's own (on in both recipes): each epoch a sample draws one of its caption
  variants ("c1 and c2", "c2 and c1", "c1", "c2"); off, it always reads the evaluation caption;
- stage two only: ``gallery_negatives``, every training image a negative (cached features make that cheap),
  and ``blend``, fuse the Combiner's and the sum's scores with a weight chosen on validation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from clip4cir.core.registry import Registry
from clip4cir.training.config import RunConfig


@dataclass(frozen=True)
class Recipe:
    symmetric: bool = False
    learn_temperature: bool = False
    label_smoothing: float = 0.0
    hard_negatives: bool = False
    caption_augmentation: bool = True
    gallery_negatives: bool = False
    blend: bool = False


RECIPES: Registry[Recipe] = Registry("--recipe")
RECIPES.add("clip4cir", Recipe())  # the paper exactly
RECIPES.add("plus", Recipe(symmetric=True, learn_temperature=True, label_smoothing=0.1, hard_negatives=True,
                           gallery_negatives=True, blend=True))
DEFAULT_RECIPE = "clip4cir"
STAGE_TWO_ONLY = ("gallery_negatives", "blend")


@dataclass
class RecipeConfig(RunConfig):
    """A contrastive run's recipe and the components it takes from it (None: the recipe's value)."""

    stage: ClassVar[int] = 1
    recipe: str = DEFAULT_RECIPE
    symmetric: bool | None = None
    learn_temperature: bool | None = None
    temperature_lr: float = 1e-3  # the learned logit scale's own rate (CLIP's own training gives it one)
    label_smoothing: float | None = None
    hard_negatives: bool | None = None
    caption_augmentation: bool | None = None

    def __post_init__(self) -> None:
        apply_recipe(self, self.stage)


def apply_recipe(config: RecipeConfig, stage: int) -> None:
    """Fill each component the config leaves unset (None) from its recipe, in place."""
    for name, value in asdict(RECIPES[config.recipe]).items():
        if stage == 1 and name in STAGE_TWO_ONLY:
            continue
        if getattr(config, name, None) is None:
            setattr(config, name, value)
