"""Choosing an index from measurements: the kind for a catalog's size and a memory budget, and the search effort
(nprobe or efSearch) that reaches a target Recall@10 against exact search, calibrated when the index is built.

Calibration uses every kind of query the index will serve: image queries (a random sample of the catalog, put
last and encoded only after the calibration searched the others with them), and composed and text queries made
from the data set's captions (:func:`calibration_half` of its triplets; the other half is left for measuring) or,
where it has none, from category names and attribute words. The ground truth is exact search of the
full-precision vectors. The rule is stable, so the same data gives the same index: the smallest effort, then the
smallest re-ranking depth, at which every kind of query reaches the target. Each category searched approximately
gets its own effort: a filter must not silently drop true neighbours.
"""
from __future__ import annotations

import os
import zlib
from typing import Callable

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


def calibration_half(reference: str, caption: str) -> bool:
    """Whether a (reference, caption) query is one calibration may use; the others are left for measuring what
    an index gives (benchmarks and tests use ``not calibration_half(...)``)."""
    return zlib.crc32(f"{reference}|{caption}".encode()) % 2 == 0


def calibrate(index, target: float, held_out: np.ndarray, queries: dict[str, np.ndarray] | None = None) -> dict:
    """Choose, for a ``CatalogIndex`` whose codes do not hold the ``held_out`` rows yet, the search effort and
    re-ranking depth at which the held-out items as image queries, and every other kind of ``queries`` (unit-length
    features, e.g. "composed" and "text"), reach ``target`` Recall@10 against exact search over the other rows:
    the smallest effort, then the smallest depth, that does; then the effort of each category searched
    approximately. Where nothing reaches the target, the setting whose worst kind of query does best, and the
    measured recall says so."""
    store = index.store
    family = store.family
    efforts = [e for e in EFFORTS[family] if family == "hnsw" or e <= store.nlist]
    if family == "ivf" and store.nlist not in efforts:
        efforts.append(store.nlist)
    kinds = {"image": store.vectors(held_out), **{k: v for k, v in (queries or {}).items() if len(v)}}
    coded = np.zeros(len(store), dtype=bool)
    coded[:store.coded()] = True
    coded &= ~np.asarray(index.table.deleted)
    groups = {"": coded} | {c: coded & index._allowed(c) for c in index.categories()
                            if len(index.members(c)) > index.exact_members}

    def measure(allowed: np.ndarray, truth: dict, effort: int) -> dict[str, float]:
        return {kind: round(recall(store.search(q, K, allowed, effort)[1], truth[kind]), 4)
                for kind, q in kinds.items()}

    def choose(allowed: np.ndarray, k_factors) -> dict:
        truth = {kind: store.search_rows(q, K, np.flatnonzero(allowed))[1] for kind, q in kinds.items()}

        def measured(setting: dict) -> dict[str, float]:
            store.k_factor = setting["k_factor"]
            return measure(allowed, truth, setting["effort"])

        return first_reaching([{"effort": e, "k_factor": f} for e in efforts for f in k_factors], measured, target)

    chosen = {"": choose(groups[""], K_FACTORS)}
    for name, allowed in groups.items():
        if name:
            chosen[name] = choose(allowed, [chosen[""]["k_factor"]])
    store.k_factor = chosen[""]["k_factor"]
    return {"target_recall": target, "k": K, "queries": {kind: len(q) for kind, q in kinds.items()},
            "rule": "the smallest effort, then the smallest re-ranking depth, reaching the target for every kind",
            "k_factor": store.k_factor, "effort": {name: c["effort"] for name, c in chosen.items()},
            "recall": {name: c["recall"] for name, c in chosen.items()}}


def first_reaching(settings: list[dict], measure: Callable[[dict], dict[str, float]], target: float) -> dict:
    """The first of ``settings`` (in order of cost) at which every kind of query reaches ``target``, with what it
    measured; where none does, the one whose worst kind does best (the cheapest of those)."""
    tried = []
    for setting in settings:
        tried.append({**setting, "recall": measure(setting)})
        if min(tried[-1]["recall"].values()) >= target:
            return tried[-1]
    return max(tried, key=lambda t: min(t["recall"].values()))  # max keeps the first of equals


def describe_tuning(tuning: dict) -> str:
    """The calibration in one line: the chosen effort and what every kind of query measured with it."""
    overall = ", ".join(f"{kind} {r:.3f}" for kind, r in tuning["recall"][""].items())
    counts = ", ".join(f"{n} {kind}" for kind, n in tuning["queries"].items())
    line = (f"calibrated for Recall@10 ≥ {tuning['target_recall']}: effort {tuning['effort']['']}, re-ranking "
            f"depth ×{tuning['k_factor']}; measured {overall} ({counts} queries)")
    others = {name: r for name, r in tuning["recall"].items() if name}
    if others:
        line += "; by category: " + "; ".join(f"{name} (effort {tuning['effort'][name]}) " + ", ".join(
            f"{kind} {v:.3f}" for kind, v in r.items()) for name, r in others.items())
    return line
