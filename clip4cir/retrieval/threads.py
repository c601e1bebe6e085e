"""How many threads serving uses: the one place that sets them.

A single query cannot use more than one FAISS thread, and FAISS's OpenMP threads busy-wait: left at their
default they compete with torch's own threads for the same cores, and single queries slow down. Serving (the
app, ``clip4cir search``) therefore calls :func:`configure_serving_threads` once: FAISS gets one thread, torch
the cores. FAISS (its own OpenMP runtime) keeps the setting per thread, so every thread that searches applies
it with :func:`apply_serving_threads` (the search engine does, e.g. in Gradio's worker threads). Batch work
(building and calibrating an index, evaluation) keeps the defaults.
"""
from __future__ import annotations

import os
import threading

import faiss
import torch

_serving: dict = {}
_applied = threading.local()


def configure_serving_threads(faiss_threads: int = 1, torch_threads: int | None = None) -> dict:
    """Set torch's threads and the FAISS threads every serving thread uses; returns them. The environment
    variables ``CLIP4CIR_FAISS_THREADS`` and ``CLIP4CIR_TORCH_THREADS`` override the arguments."""
    _serving["faiss"] = int(os.environ.get("CLIP4CIR_FAISS_THREADS", faiss_threads))
    _serving["torch"] = int(os.environ.get("CLIP4CIR_TORCH_THREADS", torch_threads or os.cpu_count() or 1))
    torch.set_num_threads(_serving["torch"])
    _applied.faiss = None
    apply_serving_threads()
    return dict(_serving)


def apply_serving_threads() -> None:
    """In the calling thread, give FAISS the serving thread count (once configured; a no-op otherwise)."""
    if _serving and getattr(_applied, "faiss", None) != _serving["faiss"]:
        faiss.omp_set_num_threads(_serving["faiss"])
        _applied.faiss = _serving["faiss"]
