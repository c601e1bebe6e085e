"""What a training run is told: plain dataclasses that the commands fill from the command line (and tests or
notebooks fill directly). ``params.json`` records :func:`run_params` of one, flat, and ``--resume`` compares it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from clip4cir.data.sources import SourceOptions


@dataclass
class RunConfig:
    """The settings every trainer takes (each task's config adds its own)."""

    source: SourceOptions = field(default_factory=lambda: SourceOptions(""))
    output: str = ""
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    val_every: int = 1
    save_best: bool = False
    save_every: int = 0
    resume: bool = False
    workers: int = 0
    max_steps: int = 0
    quiet: bool = False
    seed: int = 0
    device: str = "auto"
    model: str | None = None
    pretrained: str | None = None
    clip_checkpoint: str | None = None


# settings that say how a run is carried out, not what it learns: not recorded, never compared
PER_INVOCATION = ("resume", "quiet", "max_steps")


def run_params(config: RunConfig, world_size: int) -> dict:
    """The settings a run records in params.json, flat (the data set's options beside the others)."""
    params = asdict(config)
    source = params.pop("source")
    return {**source, **{k: v for k, v in params.items() if k not in PER_INVOCATION}, "world_size": world_size}
