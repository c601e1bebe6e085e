"""A training run's folder: hyper-parameters, metrics log and resumable state, all written atomically.

``params.json`` holds the hyper-parameters; ``metrics.jsonl`` one JSON line per epoch; ``last.state.pt`` what
``--resume`` needs beyond the weights (optimizer, grad scaler, epoch, step, RNG states, best score).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DataError
from .distributed import gather_objects
from .models import atomic_write

# arguments that must match for --resume to continue the same run
RESUME_KEYS = ("model", "pretrained", "clip_checkpoint", "encoder", "batch_size", "lr", "seed", "categories",
               "data", "proj_dim", "hidden_dim", "world_size")


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


def run_params(args, world_size: int) -> dict:
    """The hyper-parameters a run records (and --resume checks): the arguments, less the per-invocation ones."""
    params = {k: v for k, v in vars(args).items() if k not in ("resume", "quiet", "max_steps")}
    return {**params, "world_size": world_size}


class RunDir:
    """The output folder of one training run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.params_file = self.path / "params.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.state_file = self.path / "last.state.pt"

    def file(self, name: str) -> Path:
        return self.path / name

    def check_new_or_resumable(self, params: dict, resume: bool) -> None:
        """Refuse to overwrite a finished or interrupted run unless resuming it with the same settings."""
        if resume:
            if not self.state_file.is_file():
                raise DataError(f"--resume: {self.path} holds no run to resume ({self.state_file.name} is missing)")
            saved = json.loads(self.params_file.read_text())
            changed = [k for k in RESUME_KEYS if k in params and saved.get(k) != params[k]]
            if changed:
                what = ", ".join(f"{k} was {saved.get(k)!r}, now {params[k]!r}" for k in changed)
                raise DataError(f"--resume: {what}"
                                f" in {self.params_file}")
        elif self.state_file.is_file() or self.metrics_file.is_file():
            raise DataError(f"--output {self.path} already holds a run; pass --resume to continue it "
                            f"or choose another folder")

    def start(self, params: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        text = json.dumps(params, indent=1, default=str)
        atomic_write(self.params_file, lambda tmp: tmp.write_text(text))

    def log_metrics(self, record: dict) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, epochs_done: int) -> None:
        """On resume, drop log lines of epochs the saved state does not include (a crash after logging)."""
        if self.metrics_file.is_file():
            lines = [line for line in self.metrics_file.read_text().splitlines()
                     if line and json.loads(line)["epoch"] < epochs_done]
            atomic_write(self.metrics_file, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))

    def save_state(self, state: dict[str, Any], rng_states: list[dict]) -> None:
        """Write the training state with every rank's RNG state (rank order)."""
        atomic_write(self.state_file, lambda tmp: torch.save({**state, "rng": rng_states}, tmp))

    def save_training_state(self, state: dict, optimizer, scaler, is_main: bool = True) -> None:
        """Called on every rank: gathers each rank's RNG state; the main rank writes."""
        rng_states = gather_objects(rng_state())
        if is_main:
            self.save_state({**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}, rng_states)

    def resume(self, optimizer, scaler, weights_step: int | None, rank: int = 0, is_main: bool = True) -> dict:
        """Restore optimizer, scaler, this rank's RNG and the loop state; checks the weights are of the same step."""
        saved = self.load_state()
        if weights_step != saved["global_step"]:
            raise DataError(f"the weights in {self.path} (step {weights_step}) do not match {self.state_file} "
                            f"(step {saved['global_step']})")
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"][rank])
        if is_main:
            self.truncate_metrics(saved["epoch"])
        return {k: saved[k] for k in ("epoch", "step_in_epoch", "global_step", "best", "loss_sum")}

    def load_state(self) -> dict[str, Any]:
        try:
            return torch.load(self.state_file, map_location="cpu", weights_only=False)
        except Exception as e:
            raise DataError(f"cannot read training state {self.state_file}: {e}") from e
