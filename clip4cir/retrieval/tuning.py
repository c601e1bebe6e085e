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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

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


def recall(found: Sequence[Sequence], truth: Sequence[Sequence]) -> float:
    """Mean share of each query's true top-k that was found (ids or rows; rows of -1 are padding)."""
    def kept(row: Sequence) -> set:
        return {r for r in row if not (isinstance(r, (int, np.integer)) and r < 0)}
    return float(np.mean([len(kept(f) & kept(t)) / max(len(kept(t)), 1) for f, t in zip(found, truth, strict=True)]))


def calibration_half(reference: str, caption: str) -> bool:
    """Whether a (reference, caption) query is one calibration may use; the others are left for measuring what
    an index gives (benchmarks and tests use ``not calibration_half(...)``)."""
    return zlib.crc32(f"{reference}|{caption}".encode()) % 2 == 0


@dataclass(frozen=True)
class Calibration:
    """What calibrating a store needs of it: the queries of each kind (unit-length), the groups that get their own
    effort ("" = no filter first, then each category searched approximately), the efforts and re-ranking depths to
    try in order of cost, the true top-K of a group's queries and what the store finds with a setting."""

    kinds: dict[str, np.ndarray]
    groups: Sequence[str]
    efforts: Sequence[int]
    k_factors: Sequence[int]
    exact: Callable[[str, str, np.ndarray], Sequence[Sequence]]  # (group, kind, queries) -> true top-K
    approximate: Callable[[str, str, np.ndarray, dict], Sequence[Sequence]]  # (..., {effort, k_factor}) -> top-K


def calibrate(calibration: Calibration, target: float) -> dict:
    """The smallest effort, then the smallest re-ranking depth, at which every kind of query reaches ``target``
    Recall@10 against exact search with no filter; then, at that depth, the smallest effort of each category.
    Where nothing reaches the target, the setting whose worst kind of query does best, and the measured recall
    says so. The same loop serves every store (FAISS files, Milvus)."""
    kinds = calibration.kinds

    def choose(group: str, k_factors: Sequence[int]) -> dict:
        truth = {kind: calibration.exact(group, kind, q) for kind, q in kinds.items()}

        def measured(setting: dict) -> dict[str, float]:
            return {kind: round(recall(calibration.approximate(group, kind, q, setting), truth[kind]), 4)
                    for kind, q in kinds.items()}

        return first_reaching([{"effort": e, "k_factor": f} for e in calibration.efforts for f in k_factors],
                              measured, target)

    chosen = {"": choose("", calibration.k_factors)}
    for group in calibration.groups:
        if group:
            chosen[group] = choose(group, [chosen[""]["k_factor"]])
    return {"target_recall": target, "k": K, "queries": {kind: len(q) for kind, q in kinds.items()},
            "rule": "the smallest effort" + (", then the smallest re-ranking depth," if len(calibration.k_factors) > 1
                                             else "") + " reaching the target for every kind",
            "k_factor": chosen[""]["k_factor"], "effort": {name: c["effort"] for name, c in chosen.items()},
            "recall": {name: c["recall"] for name, c in chosen.items()}}


def efforts_for(family: str, nlist: int) -> list[int]:
    """The efforts calibration tries: efSearch values of a graph, nprobe values up to ``nlist`` (itself included)
    of inverted lists."""
    if family == "hnsw":
        return list(EFFORTS["hnsw"])
    return sorted({e for e in EFFORTS["ivf"] if e <= nlist} | {nlist})


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
