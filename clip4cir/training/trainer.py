"""The one trainer: every training run (stage one, stage two, learning from labels, image-text pairs, φ) is a
:class:`TrainingTask` that supplies its model, batches and loss; :class:`Trainer` owns the rest, the same for all:
the run folder and its checks, the optimizer and the learned temperature's own rate, mixed precision, DDP, exact
resume, checkpoints, the epoch loop, validation, logs and the checks that a loss or weight is a number.

    config = StageOneConfig(...)                       # what the command line said
    Trainer(StageOneTask(config, source, ddp, device)).fit()

A task is a small subclass (as pytorch-metric-learning's trainers subclass ``BaseTrainer``); the trainer calls its
hooks in this order: ``setup`` (the model, from a checkpoint when resuming), ``training_data`` (what resume
compares), ``module`` (what DDP wraps), ``parameter_groups``/``make_optimizer``, ``batches``, then per epoch
``start_epoch`` and per step ``loss``, ``after_step``; ``validate`` and ``write_model`` at the end of an epoch.
"""
from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from clip4cir.core.device import amp_dtype, resolve_device
from clip4cir.core.distributed import Dist, barrier, mean_over_ranks
from clip4cir.core.errors import NonFiniteError
from clip4cir.data.sources import Source
from clip4cir.training.checkpointing import open_run
from clip4cir.training.config import RunConfig
from clip4cir.training.losses import Temperature
from clip4cir.training.samplers import ResumableSampler

log = logging.getLogger(__name__)
StepHook = Callable[[dict], None]


def amp_settings(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, use a grad scaler): bf16 where supported, else fp16 with a scaler on CUDA; fp32 on CPU."""
    dtype = amp_dtype(device)
    return dtype, dtype == torch.float16


def new_state() -> dict:
    """Where a run stands: epochs done, steps into the current epoch and in all, best score, epoch loss so far."""
    return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": -math.inf, "loss_sum": 0.0}


def epoch_summary(record: dict) -> str:
    """One line per epoch: loss, throughput, the learned scale, and recall when validated."""
    line = (f"epoch {record['epoch'] + 1}: loss {record['loss']:.4f}, {record['seconds']:.1f}s, "
            f"{record['samples_per_s']:.1f} samples/s, data wait {100 * record['data_wait_share']:.0f}%")
    if "logit_scale" in record:
        line += f", logit scale {record['logit_scale']:.2f}"
    if "average" in record:
        line += ", val avg " + " ".join(f"{k} {v:.2f}" for k, v in record["average"].items())
    return line


def check_finite_parameters(parameters: Iterable[torch.Tensor], where: str) -> None:
    """NonFiniteError when a weight is NaN or infinite: such a model is never saved."""
    for p in parameters:
        if not torch.isfinite(p).all():
            raise NonFiniteError(f"the weights became NaN or infinite {where}; nothing from this point was saved "
                                 f"(lower --lr?)")


def average_gradient(parameter: torch.Tensor) -> None:
    """Under torchrun, average a gradient that DistributedDataParallel does not see (the learned temperature)."""
    if parameter.grad is not None:
        parameter.grad.copy_(torch.tensor(mean_over_ranks(float(parameter.grad))))


class TrainingTask(ABC):
    """What one kind of training run supplies (see the module docstring); ``self.forward`` is ``module()``
    wrapped in DDP under torchrun, ``self.amp_dtype`` the mixed-precision type, both set by the trainer."""

    temperature: Temperature | None = None  # the logit scale, when the task's loss has one

    def __init__(self, config: RunConfig, source: Source, ddp: Dist, device: torch.device):
        self.config, self.source, self.ddp, self.device = config, source, ddp, device
        self.forward: nn.Module | None = None
        self.amp_dtype: torch.dtype | None = None

    @abstractmethod
    def setup(self, checkpoint: Path | None) -> None:
        """Build the model (from ``checkpoint/model.safetensors`` when resuming) and the training data."""

    @abstractmethod
    def training_data(self) -> dict:
        """What the run trains on, recorded in params.json: ``{"train": {..., "fingerprint", "parts"}, ...}``."""

    @abstractmethod
    def module(self) -> nn.Module:
        """The module whose forward computes the features the loss needs (DDP wraps it)."""

    @abstractmethod
    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups (only what trains)."""

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """AdamW with the reference's betas and eps (a task may choose another)."""
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=(0.9, 0.999), eps=1e-7,
                                 weight_decay=getattr(self.config, "weight_decay", 0.0))

    def state_modules(self) -> dict[str, nn.Module]:
        """Modules (or anything with ``state_dict``/``load_state_dict``) outside the model whose state a
        checkpoint keeps: a loss's proxies, the temperature, a monitor."""
        return {"temperature": self.temperature} if self.temperature is not None else {}

    @abstractmethod
    def batches(self) -> tuple[ResumableSampler, Iterable]:
        """The sampler (resumable) and what yields this process's batches in its order."""

    @abstractmethod
    def loss(self, batch: Any, epoch: int) -> tuple[torch.Tensor, int]:
        """The loss of one batch and how many samples it held (this process's)."""

    def start_epoch(self, epoch: int) -> None:  # noqa: B027 (an optional hook)
        """Before an epoch: e.g. the caption draw of the epoch, training modes."""

    def after_step(self) -> None:  # noqa: B027 (an optional hook)
        """After an optimizer step: e.g. forget a cached fingerprint of the weights."""

    def end_epoch(self, epoch: int, loss: float) -> dict:
        """After an epoch's steps, before validation: what the task adds to the epoch's log record (and a place
        to stop a run that cannot go on)."""
        return {}

    @abstractmethod
    def validate(self) -> dict:
        """Validation metrics: ``{"average": {...}, "score": float, ...}`` (the main process only)."""

    @abstractmethod
    def write_model(self, path: Path, info: dict) -> None:
        """Write the model file of a checkpoint or of best.safetensors; ``info`` has epoch, step and metrics."""

    @abstractmethod
    def weights(self) -> Iterable[torch.Tensor]:
        """The weights checked to be finite before each save."""


class Trainer:
    """Runs a :class:`TrainingTask` until its epochs are done (or ``max_steps``, resumably). ``hooks`` are called
    after each step with ``{"step", "loss", "samples", "seconds", "wait"}`` (benchmarks measure throughput so)."""

    def __init__(self, task: TrainingTask, hooks: Iterable[StepHook] = ()):
        self.task, self.hooks = task, list(hooks)
        self.config, self.ddp = task.config, task.ddp

    def fit(self) -> bool:
        """Train; True when every epoch is done, False when stopped by ``max_steps``."""
        task, config, ddp = self.task, self.config, self.ddp
        self.run_dir, params = open_run(config, ddp.world_size)
        checkpoint = self.run_dir.latest_checkpoint() if config.resume else None
        task.setup(checkpoint)
        data = task.training_data()
        if config.resume:
            self.run_dir.check_same_data(data)  # (a run stopped before its first checkpoint starts again)
        module = task.module()
        device = task.device
        task.forward = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None) \
            if ddp.enabled else module
        groups = task.parameter_groups()
        temperature = task.temperature
        if temperature is not None and temperature.learned:
            groups.append({"params": [temperature.log_scale], "lr": config.temperature_lr, "weight_decay": 0.0})
        self.optimizer = task.make_optimizer(groups)
        task.amp_dtype, use_scaler = amp_settings(device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.sampler, batches = task.batches()
        if checkpoint is not None:
            self.state = self.run_dir.resume(checkpoint, self.optimizer, self.scaler, ddp.rank, ddp.is_main)
            for name, module_ in task.state_modules().items():
                module_.load_state_dict(self.state["modules"][name])
        else:
            self.state = new_state()
            if ddp.is_main:
                self.run_dir.start({**params, "training_data": data})
            torch.manual_seed(config.seed + ddp.rank)
        return self._epochs(batches)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _where(self) -> str:
        s = self.state
        return f"at epoch {s['epoch'] + 1}, step {s['step_in_epoch']} (global step {s['global_step']})"

    def _info(self, metrics: dict | None) -> dict:
        return {"epoch": self.state["epoch"], "global_step": self.state["global_step"], "metrics": metrics}

    def _save(self, metrics: dict | None) -> None:
        check_finite_parameters(self.task.weights(), self._where())
        self.state["modules"] = {name: m.state_dict() for name, m in self.task.state_modules().items()}
        self.run_dir.save_checkpoint(self.state["global_step"], lambda path: self.task.write_model(
            path, self._info(metrics)), self.state, self.optimizer, self.scaler, self.ddp.is_main)

    def _step(self, batch: Any, epoch: int) -> tuple[float, int]:
        loss, samples = self.task.loss(batch, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        temperature = self.task.temperature
        if temperature is not None and temperature.learned:
            average_gradient(temperature.log_scale)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if temperature is not None:
            temperature.bound()
        self.task.after_step()
        return mean_over_ranks(loss.item()), samples * self.ddp.world_size

    def _epochs(self, batches: Iterable) -> bool:
        config, state, is_main = self.config, self.state, self.ddp.is_main
        while state["epoch"] < config.epochs:
            epoch = state["epoch"]
            self.sampler.set_epoch(epoch, state["step_in_epoch"])
            self.task.start_epoch(epoch)
            started, waited, seen = time.perf_counter(), 0.0, 0
            bar = tqdm(total=self.sampler.batches_per_epoch(), initial=state["step_in_epoch"],
                       desc=f"epoch {epoch + 1}", disable=config.quiet or not is_main, leave=False)
            iterator = iter(batches)
            while True:
                t0 = time.perf_counter()
                batch = next(iterator, None)
                t1 = time.perf_counter()
                waited += t1 - t0
                if batch is None:
                    break
                loss, n = self._step(batch, epoch)
                state["step_in_epoch"] += 1
                state["global_step"] += 1
                if not math.isfinite(loss):
                    bar.close()
                    raise NonFiniteError(f"the loss became {loss} {self._where()}; the run stopped and nothing from "
                                         f"this point was saved (lower --lr?); --resume continues from the last "
                                         f"checkpoint")
                state["loss_sum"] += loss
                seen += n
                for hook in self.hooks:
                    hook({"step": state["global_step"], "loss": loss, "samples": n,
                          "seconds": time.perf_counter() - t1, "wait": t1 - t0})
                bar.set_postfix(loss=f"{state['loss_sum'] / state['step_in_epoch']:.4f}",
                                samples_s=f"{seen / (time.perf_counter() - started):.1f}")
                bar.update()
                if config.max_steps and state["global_step"] >= config.max_steps:
                    bar.close()
                    self._save(None)
                    if is_main:
                        log.info("stopped after %d steps (--max-steps); --resume continues the run",
                                 state["global_step"])
                    return False
                if config.save_every and state["global_step"] % config.save_every == 0:
                    self._save(None)
            bar.close()
            self._end_epoch(epoch, time.perf_counter() - started, waited, seen)
        return True

    def _end_epoch(self, epoch: int, seconds: float, waited: float, seen: int) -> None:
        config, state, is_main = self.config, self.state, self.ddp.is_main
        record = {"epoch": epoch, "step": state["global_step"],
                  "loss": state["loss_sum"] / max(state["step_in_epoch"], 1), "seconds": seconds,
                  "samples_per_s": seen / seconds, "data_wait_share": waited / seconds}
        if self.task.temperature is not None:
            record["logit_scale"] = self.task.temperature.value()
        record.update(self.task.end_epoch(epoch, record["loss"]))
        if is_main and ((epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs):
            try:
                record.update(self.task.validate())
            except NonFiniteError as e:
                raise NonFiniteError(f"validation after epoch {epoch + 1} (global step {state['global_step']}): "
                                     f"{e}") from e
        barrier()
        state.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0)
        improved = "average" in record and record["score"] > state["best"]
        if improved:
            state["best"] = record["score"]
        if is_main:
            self.run_dir.log.append(record)
            if improved and config.save_best:  # before the checkpoint: a kill in between re-runs the epoch
                check_finite_parameters(self.task.weights(), self._where())
                self.run_dir.save_best(lambda path: self.task.write_model(path, self._info(record)))
        self._save(record.get("average"))
        if is_main:
            self.run_dir.append_metrics(record)
            log.info(epoch_summary(record))


def train_here(task: type[TrainingTask], config: RunConfig, hooks: Iterable[StepHook] = ()) -> Trainer:
    """Train in this process alone (no torchrun): what benchmarks, the demo builder and notebooks call. Returns
    the trainer (its ``run_dir`` holds the run)."""
    trainer = Trainer(task(config, config.source.open(), Dist(), resolve_device(config.device)), hooks)
    trainer.fit()
    return trainer
