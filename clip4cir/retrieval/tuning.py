"""Choosing an index from measurements: the kind for a catalog's size and a memory budget, and the search effort
(nprobe or efSearch) that reaches a target Recall@10 against exact search, calibrated when the index is built.

Calibration queries are held out: a random sample of the catalog is put last and encoded only after the
calibration searched the others with them (the ground truth is exact search of the full-precision vectors).
Each category searched approximately gets its own effort: a filter must not silently drop true neighbours.
"""
from __future__ import annotations

import os
import time

import numpy as np

from clip4cir.retrieval.vector_store import K_FACTORS

K = 10
QUERIES = 500  # held-out calibration queries (at most a tenth of the catalog)
EFFORTS = {"ivf": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
           "hnsw": (16, 32, 64, 128, 256, 512, 1024, 2048)}
FLAT_UP_TO = 100_000  # exact search stays fast enough (tens of ms on two cores) up to about this size
EXACT_MEMBERS = 50_000  # a category this small is searched exactly (its vectors read directly): never a miss


def memory_budget() -> int:
    """Half of this machine's memory, in bytes (the default budget for an index's codes)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2 ** 30


def choose_kind(n: int, dim: int, budget: int | None = None) -> str:
    """flat up to 100k items; above, IVF with 8-bit codes (re-ranked exactly) while the codes fit in the budget,
    else product-quantised codes (a byte per 8 dimensions)."""
    budget = budget or memory_budget()
    if n <= FLAT_UP_TO:
        return "flat"
    return "ivf-sq8" if n * dim * 1.1 <= budget else "ivf-pq"


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k that was found."""
    return float(np.mean([len(set(f[f >= 0]) & set(t[t >= 0])) / max((t >= 0).sum(), 1)
                          for f, t in zip(found, truth)]))


def calibrate(index, target: float, held_out: np.ndarray) -> dict:
    """Choose, for a ``CatalogIndex`` whose codes do not hold the ``held_out`` rows yet, the fastest re-ranking
    depth and search effort that reach ``target`` Recall@10 on them (against exact search over the other rows),
    then the effort for each category searched approximately. Where nothing reaches the target, the setting with
    the best recall, and the measured recall says so."""
    store = index.store
    family = store.family
    efforts = [e for e in EFFORTS[family] if family == "hnsw" or e <= store.nlist]
    if family == "ivf" and store.nlist not in efforts:
        efforts.append(store.nlist)
    queries = store.vectors(held_out)
    coded = np.zeros(len(store), dtype=bool)
    coded[:store.coded()] = True
    coded &= ~np.asarray(index.table.deleted)
    groups = {"": coded} | {c: coded & index._allowed(c) for c in index.categories()
                            if len(index.members(c)) > index.exact_members}

    def sweep(allowed: np.ndarray) -> list[dict]:
        truth = store.search_rows(queries, K, np.flatnonzero(allowed))[1]
        tried = []
        for effort in efforts:
            started = time.perf_counter()
            found = store.search(queries, K, allowed, effort)[1]
            tried.append({"effort": effort, "k_factor": store.k_factor, "recall": round(recall(found, truth), 4),
                          "seconds": time.perf_counter() - started})
            if tried[-1]["recall"] >= target:
                break
        return tried

    def best(tried: list[dict]) -> dict:
        reached = [t for t in tried if t["recall"] >= target]
        return min(reached, key=lambda t: t["seconds"]) if reached else max(tried, key=lambda t: t["recall"])

    tried = []
    for k_factor in K_FACTORS:
        store.k_factor = k_factor
        tried += sweep(groups[""])
    chosen = {"": best(tried)}
    store.k_factor = chosen[""]["k_factor"]
    for name, allowed in groups.items():
        if name:
            chosen[name] = best(sweep(allowed))
    return {"target_recall": target, "k": K, "queries": len(held_out), "k_factor": store.k_factor,
            "effort": {name: c["effort"] for name, c in chosen.items()},
            "recall": {name: c["recall"] for name, c in chosen.items()}}
