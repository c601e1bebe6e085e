"""The epoch loop both training stages share: seeded order, progress bar, throughput, validation, logs, saves."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from .checkpointing import RunDir
from .distributed import barrier
from .errors import NonFiniteError


class EpochSampler(Sampler[int]):
    """The distributed sampler of both stages: a seeded permutation per epoch (the same on every run, resume and
    world size), cut into global batches of ``batch_size × world_size``; each rank takes its slice of each global
    batch, so N ranks at batch b see exactly the batches one process sees at batch N·b. Batches already done in
    an interrupted epoch can be skipped. With ``groups`` (a label per sample, e.g. its category), every batch
    holds one group's samples, so the in-batch negatives are of the same kind: harder than a random batch's."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 groups: Sequence | None = None):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.skip_batches = 0, 0
        self.groups = None
        if groups is not None:
            labels = {g: i for i, g in enumerate(sorted(set(groups), key=str))}
            self.groups = torch.tensor([labels[g] for g in groups])

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches_per_epoch(self) -> int:
        global_batch = self.batch_size * self.world_size
        if self.groups is None:
            return self.n // global_batch
        return int(sum(int(c) // global_batch for c in torch.bincount(self.groups)))

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        global_batch = self.batch_size * self.world_size
        order = torch.randperm(self.n, generator=generator)
        if self.groups is None:
            batches = order[: self.batches_per_epoch() * global_batch].view(-1, global_batch)
        else:
            parts = []
            for label in range(int(self.groups.max()) + 1):
                members = order[self.groups[order] == label]
                parts.append(members[: len(members) // global_batch * global_batch].view(-1, global_batch))
            batches = torch.cat(parts)
            batches = batches[torch.randperm(len(batches), generator=generator)]
        mine = batches.view(-1, self.world_size, self.batch_size)[self.skip_batches:, self.rank]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip_batches) * self.batch_size


def new_state() -> dict:
    """Where a run stands: epochs done, steps into the current epoch and in all, best score, epoch loss so far."""
    return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": -math.inf, "loss_sum": 0.0}


def score(metrics: dict) -> float:
    """What --save-best maximises: the data set's headline score (FashionIQ: the mean of the average R@10 and
    R@50; CIRR: the mean of R@5 and Rs@1)."""
    return metrics["score"]


def epoch_summary(record: dict) -> str:
    """One line per epoch: loss, throughput, and recall when validated."""
    line = (f"epoch {record['epoch'] + 1}: loss {record['loss']:.4f}, {record['seconds']:.1f}s, "
            f"{record['triplets_per_s']:.1f} triplets/s, data wait {100 * record['data_wait_share']:.0f}%")
    if "average" in record:
        line += ", val avg " + " ".join(f"{k} {v:.2f}" for k, v in record["average"].items())
    return line


def check_finite_parameters(parameters: Iterable[torch.Tensor], where: str) -> None:
    """NonFiniteError when a weight is NaN or infinite: such a model is never saved."""
    for p in parameters:
        if not torch.isfinite(p).all():
            raise NonFiniteError(f"the weights became NaN or infinite {where}; nothing from this point was saved "
                                 f"(lower --lr?)")


def run_epochs(run_dir: RunDir, state: dict, *, epochs: int, sampler: EpochSampler, batches: Iterable,
               step: Callable[[Any, int], tuple[float, int]], validate: Callable[[], dict], val_every: int,
               write_model: Callable[[Path, dict | None], None], parameters: Callable[[], Iterable[torch.Tensor]],
               optimizer, scaler, save_best: bool, start_epoch: Callable[[int], None], max_steps: int = 0,
               save_every: int = 0, progress: bool = True, is_main: bool = True) -> bool:
    """Train until ``epochs`` are done (True) or ``max_steps`` steps in all (False, resumable mid-epoch).

    ``step(batch, epoch)`` trains on one batch and returns (loss over all ranks, triplets over all ranks);
    ``write_model(path, metrics)`` writes the model file of a checkpoint (or best.safetensors). A checkpoint is
    committed after every epoch, every ``save_every`` steps and at ``max_steps`` (on every rank: it gathers the RNG
    states). A non-finite loss, weight or validation feature stops the run with an error naming the step; the
    last checkpoint stays the last good one. Only the main rank validates, logs and prints.
    """
    def where() -> str:
        return f"at epoch {state['epoch'] + 1}, step {state['step_in_epoch']} (global step {state['global_step']})"

    def save(metrics: dict | None) -> None:
        check_finite_parameters(parameters(), where())
        run_dir.save_checkpoint(state["global_step"], lambda path: write_model(path, metrics), state, optimizer,
                                scaler, is_main)

    while state["epoch"] < epochs:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, state["step_in_epoch"])
        start_epoch(epoch)
        started, waited, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(total=sampler.batches_per_epoch(), initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}",
                   disable=not (progress and is_main), leave=False)
        iterator = iter(batches)
        while True:
            t0 = time.perf_counter()
            batch = next(iterator, None)
            waited += time.perf_counter() - t0
            if batch is None:
                break
            loss, n = step(batch, epoch)
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            if not math.isfinite(loss):
                bar.close()
                raise NonFiniteError(f"the loss became {loss} {where()}; the run stopped and nothing from this "
                                     f"point was saved (lower --lr?); --resume continues from the last checkpoint")
            state["loss_sum"] += loss
            seen += n
            bar.set_postfix(loss=f"{state['loss_sum'] / state['step_in_epoch']:.4f}",
                            triplets_s=f"{seen / (time.perf_counter() - started):.1f}")
            bar.update()
            if max_steps and state["global_step"] >= max_steps:
                bar.close()
                save(None)
                if is_main:
                    print(f"stopped after {state['global_step']} steps (--max-steps); --resume continues the run")
                return False
            if save_every and state["global_step"] % save_every == 0:
                save(None)
        bar.close()
        seconds = time.perf_counter() - started
        record = {"epoch": epoch, "step": state["global_step"],
                  "loss": state["loss_sum"] / max(state["step_in_epoch"], 1), "seconds": seconds,
                  "triplets_per_s": seen / seconds, "data_wait_share": waited / seconds}
        if is_main and ((epoch + 1) % val_every == 0 or epoch + 1 == epochs):
            try:
                record.update(validate())
            except NonFiniteError as e:
                raise NonFiniteError(f"validation after epoch {epoch + 1} (global step {state['global_step']}): "
                                     f"{e}") from e
        barrier()
        state.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0)
        improved = "average" in record and score(record) > state["best"]
        if improved:
            state["best"] = score(record)
        if is_main:
            run_dir.log.append(record)
            if improved and save_best:  # before the checkpoint: a kill in between re-runs the epoch, same result
                check_finite_parameters(parameters(), where())
                run_dir.save_best(lambda path: write_model(path, record))
        save(record.get("average"))
        if is_main:
            run_dir.append_metrics(record)
            print(epoch_summary(record))
    return True
