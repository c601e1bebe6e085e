"""Queries that arrive together are encoded together: each tower has one worker that takes the queries waiting
for it, up to ``max_batch``, after waiting at most ``window`` seconds for more, and runs them as one batch. Far
more throughput under concurrent clients on a CPU; a query alone pays at most the window. The queue is bounded: a
query beyond ``max_pending`` waiting is refused at once (BusyError, HTTP 503) instead of growing the wait."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import torch

from clip4cir.core.errors import BusyError
from clip4cir.models.runtime import Towers

log = logging.getLogger(__name__)
WINDOW = 0.003
MAX_BATCH = 16
MAX_PENDING = 64
TIMEOUT = 60.0  # a query never waits longer than this for its features


class _Worker:
    """One tower's queue and the thread that drains it batch by batch."""

    def __init__(self, run, join, window: float, max_batch: int, max_pending: int, name: str):
        self.run, self.join = run, join
        self.window, self.max_batch, self.max_pending = window, max_batch, max_pending
        self.queue: queue.Queue = queue.Queue()
        self.pending = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, name=f"batching-{name}", daemon=True).start()

    def submit(self, payload):
        with self.lock:
            if self.pending >= self.max_pending:
                raise BusyError(f"the server is busy ({self.pending} queries are waiting to be encoded); try again "
                                f"in a moment")
            self.pending += 1
        future: Future = Future()
        self.queue.put((payload, future))
        try:
            return future.result(timeout=TIMEOUT)
        finally:
            with self.lock:
                self.pending -= 1

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.perf_counter() + self.window
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    batch.append(self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                payload, sizes = self.join([p for p, _ in batch])
                out = self.run(payload)
                start = 0
                for (_, future), size in zip(batch, sizes, strict=True):
                    future.set_result(out[start:start + size])
                    start += size
            except Exception as e:  # every query of the batch gets the error
                for _, future in batch:
                    future.set_exception(e)


def _join_images(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    return torch.cat(parts), [len(p) for p in parts]


def _join_texts(parts: list[list[str]]) -> tuple[list[str], list[int]]:
    return [t for p in parts for t in p], [len(p) for p in parts]


class BatchedTowers(Towers):
    """Towers whose calls from many threads are batched (see the module docstring)."""

    def __init__(self, towers: Towers, window: float = WINDOW, max_batch: int = MAX_BATCH,
                 max_pending: int = MAX_PENDING):
        super().__init__(towers.encoder)
        self.inner = towers
        self.name = towers.name
        self._image = _Worker(towers.image, _join_images, window, max_batch, max_pending, "image")
        self._text = _Worker(towers.text, _join_texts, window, max_batch, max_pending, "text") \
            if towers.encoder.has_text else None

    def image(self, images: torch.Tensor) -> torch.Tensor:
        return self._image.submit(images)

    def text(self, texts: Sequence[str]) -> torch.Tensor:
        return self._text.submit(list(texts))

    def describe(self) -> str:
        return f"{self.inner.describe()}, queries batched (window {1000 * self._image.window:g} ms, at most " \
               f"{self._image.max_batch})"
