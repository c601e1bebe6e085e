"""A training run's folder, written so that a kill at any moment loses at most the work since the last save.

    OUTPUT/params.json                  hyper-parameters and the data trained on (written at the start)
    OUTPUT/metrics.jsonl                one JSON line per epoch
    OUTPUT/best.safetensors             the best validated model (--save-best)
    OUTPUT/checkpoints/step-000000120/  one save, committed as one unit (clip4cir.core.artifacts): model.safetensors,
                                        state.pt (optimizer, grad scaler, loop state, every rank's RNG state),
                                        metrics.jsonl (the log up to this step) and manifest.json

``--resume`` continues from the newest checkpoint whose files are complete, and restores ``metrics.jsonl`` from
it (so a line cut by a kill, or logged after the checkpoint, is dropped). The two newest checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from clip4cir.core.artifacts import (
    atomic_write,
    atomic_write_text,
    clean_temporaries,
    read_json,
    read_manifest,
    remove_artifact,
    temp_path,
    write_folder,
)
from clip4cir.core.distributed import gather_objects
from clip4cir.core.errors import ArtifactError, DataError
from clip4cir.data.sources.base import describe_change
from clip4cir.training.config import RunConfig, run_params

CHECKPOINT_FORMAT = "clip4cir.checkpoint"
KEEP_CHECKPOINTS = 2
# the settings --resume may change: how long, how often to save or validate, where, how fast; every other setting
# (the objective, the batches, the model, the data) must be what the run started with
MAY_CHANGE_ON_RESUME = ("epochs", "save_every", "save_best", "val_every", "workers", "output", "cache_dir")
# settings added after runs were made: a params.json without one ran with this value
ADDED_SETTINGS = {"caption_augmentation": True, "sum_weight": 0.0}
RUN_FILES = ("params.json", "metrics.jsonl", "best.safetensors", "checkpoints")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def open_run(config: RunConfig, world_size: int) -> tuple[RunDir, dict]:
    """The run folder ``config.output`` and the run's parameters, checked before any work: a new run, or one
    that ``resume`` continues with the same parameters."""
    run_dir = RunDir(config.output)
    params = run_params(config, world_size)
    run_dir.check_new_or_resumable(params, config.resume)
    return run_dir, params


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``; a last line cut short by a kill is left out with a warning, a
    malformed line elsewhere is a DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                warnings.warn(f"{path}: the last line is incomplete (the run was interrupted while logging); "
                              f"it is left out", stacklevel=2)
                break
            raise DataError(f"{path}: line {number} is not JSON: {e}") from e
    return records


def _metrics_text(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


class RunDir:
    """The output folder of one training run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.params_file = self.path / "params.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.log: list[dict] = []  # the metrics records of this run so far (saved with every checkpoint)

    def file(self, name: str) -> Path:
        return self.path / name

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES)

    def check_new_or_resumable(self, params: dict, resume: bool) -> None:
        """Before any work: refuse to overwrite a run or a user's files, and refuse to resume with other settings."""
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"--output {self.path} is a file; give a folder for the run")
        if resume:
            if not self.params_file.is_file():
                raise DataError(f"--resume: {self.path} holds no run to resume ({self.params_file.name} is missing)")
            saved = read_json(self.params_file, "--resume")
            now = json.loads(json.dumps(params, default=str))  # as params.json holds them
            changed = [k for k in sorted((set(now) | set(saved)) - {"training_data"})
                       if k not in MAY_CHANGE_ON_RESUME and saved.get(k, ADDED_SETTINGS.get(k)) != now.get(k)]
            if changed:
                what = ", ".join(f"--{k.replace('_', '-')} was {saved.get(k, ADDED_SETTINGS.get(k))!r}, now "
                                 f"{now.get(k)!r}" for k in changed)
                free = ", --".join(k.replace("_", "-") for k in MAY_CHANGE_ON_RESUME)
                raise DataError(f"--resume: {what} ({self.params_file}); a resumed run keeps its objective, batches, "
                                f"model and data; only --{free} may change")
        elif self.holds_run():
            raise DataError(f"--output {self.path} already holds a run; pass --resume to continue it "
                            f"or choose another folder")
        elif self.path.is_dir() and any(p for p in self.path.iterdir() if not p.name.startswith(".")):
            raise DataError(f"--output {self.path} holds other files; choose a new or empty folder for the run")

    def check_same_data(self, data: dict) -> None:
        """--resume: the training data must be what the run started on (same annotations and image files; for a
        re-ranker, the same first stage)."""
        recorded = read_json(self.params_file, "--resume").get("training_data", {})
        saved = recorded.get("train", {})
        if saved.get("fingerprint") != data["train"]["fingerprint"]:
            what = describe_change(saved.get("parts", {}), data["train"].get("parts", {}))
            raise DataError(f"--resume: the training data changed since the run started ({what}; recorded in "
                            f"{self.params_file}); restore it, or start a new run")
        if recorded.get("first_stage") != data.get("first_stage"):
            raise DataError(f"--resume: the first stage changed since the run started (the Combiner's fingerprint "
                            f"{recorded.get('first_stage')} in {self.params_file}, now {data.get('first_stage')}); "
                            f"restore it, or start a new run")

    def start(self, params: dict) -> None:
        """Begin the run (also a resumed one that was stopped before its first checkpoint): params, empty log."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.params_file, json.dumps(params, indent=1, default=str))
        atomic_write_text(self.metrics_file, "")

    def append_metrics(self, record: dict) -> None:
        """Append one epoch's record to ``metrics.jsonl`` (the newest checkpoint holds the log up to its step)."""
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _steps(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted((p for p in self.checkpoints.glob("step-*") if p.is_dir()), reverse=True)

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint folder whose files are complete (a broken one is passed over, with a warning)."""
        for folder in self._steps():
            try:
                step = read_manifest(folder, CHECKPOINT_FORMAT).get("step")
                if folder.name != f"step-{step:09d}":
                    raise ArtifactError(f"its manifest is of step {step}")
                return folder
            except (ArtifactError, TypeError, ValueError) as e:
                warnings.warn(f"passing over checkpoint {folder}: {e}", stacklevel=2)
        return None

    def save_checkpoint(self, step: int, write_model: Callable[[Path], None], state: dict, optimizer, scaler,
                        is_main: bool = True) -> None:
        """Commit the model, optimizer, loop state, every rank's RNG and the log of one step as one folder.
        Called on every rank (it gathers the RNG states); the main rank writes."""
        rng_states = gather_objects(rng_state())
        if not is_main:
            return

        def write(tmp: Path) -> None:
            write_model(tmp / "model.safetensors")
            torch.save({**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                        "rng": rng_states}, tmp / "state.pt")
            (tmp / "metrics.jsonl").write_text(_metrics_text(self.log), encoding="utf-8")

        write_folder(self.checkpoints / f"step-{step:09d}", CHECKPOINT_FORMAT, write, {"step": step})
        for old in self._steps()[KEEP_CHECKPOINTS:]:
            try:
                remove_artifact(old, CHECKPOINT_FORMAT)
            except ArtifactError as e:  # e.g. a file of the user's inside it: kept, and said
                warnings.warn(f"keeping the old checkpoint {old}: {e}", stacklevel=2)

    def save_best(self, write_model: Callable[[Path], None]) -> None:
        atomic_write(self.file("best.safetensors"), write_model)

    def resume(self, folder: Path, optimizer, scaler, rank: int = 0, is_main: bool = True) -> dict:
        """Restore optimizer, scaler, this rank's RNG and the log from a checkpoint (the model is loaded from its
        ``model.safetensors`` by the caller); returns the loop state."""
        try:
            saved = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        except Exception as e:
            raise ArtifactError(f"cannot read training state {folder / 'state.pt'}: {e}") from e
        if len(saved["rng"]) <= rank:
            raise DataError(f"--resume: {folder} was saved by {len(saved['rng'])} processes, this is rank {rank}")
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"][rank])
        self.log = read_metrics(folder / "metrics.jsonl")
        if is_main:
            clean_temporaries(self.checkpoints)
            for newer in (p for p in self._steps() if p.name > folder.name):  # passed over as incomplete: kept aside
                aside = temp_path(newer, "broken")
                os.replace(newer, aside)
                warnings.warn(f"moved the incomplete checkpoint {newer.name} aside to {aside}", stacklevel=2)
            atomic_write_text(self.metrics_file, _metrics_text(self.log))
        return {"modules": {}, **{k: v for k, v in saved.items() if k not in ("optimizer", "scaler", "rng")}}
