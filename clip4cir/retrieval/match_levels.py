"""How well a result fits, in words a shopper reads. A cosine score means little on its own (a nonsense caption
can score higher than a good one), so each hit's score is taken relative to the query's scores over a fixed
sample of the catalog (a z-score: how far it stands out) and placed among the z-scores that known right answers
get: titles to their own images for text queries, the data set's captions with their references to their
targets for composed ones. Calibrated on one half of those queries (clip4cir.retrieval.tuning.calibration_half);
the other half measures it (``scripts/benchmark.py storefront``). A query whose first result stands out less than
the first results of nine in ten right-answer queries gets a notice that nothing in the catalog fits well."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from clip4cir.retrieval.tuning import calibration_half

LEVELS = (("strong match", 0.5), ("good match", 0.2))  # from this quantile of right answers' z-scores up
WEAK = "weak match"
FITS_QUANTILE = 0.1  # a first result below this quantile of right-answer queries' first results: nothing fits
SAMPLE = 2_000  # catalog items the spread of a query's scores is measured on
MAX_QUERIES = 256  # right-answer queries per kind

EncodeTexts = Callable[[list[str]], np.ndarray]  # texts -> unit text features
Compose = Callable[[np.ndarray, list[str]], np.ndarray]  # (reference features, captions) -> unit queries
TopScore = Callable[[np.ndarray], float]  # a unit query -> the first result's score


@dataclass(frozen=True)
class RightAnswers:
    """Queries whose right answer is known, of one kind: each query's unit feature and its answer's id."""

    queries: np.ndarray
    answers: list[str]


@dataclass(frozen=True)
class MatchLevels:
    """The catalog sample and, per kind of query, the z-score each level starts at and below which nothing
    fits."""

    sample: np.ndarray  # unit features of up to SAMPLE catalog items
    thresholds: dict[str, dict[str, float]]

    def z(self, query: np.ndarray, scores: Sequence[float]) -> list[float]:
        """The scores of ``query``'s hits as z-scores against its scores over the sample."""
        spread = self.sample @ (query / max(float(np.linalg.norm(query)), 1e-12))
        mean, std = float(spread.mean()), max(float(spread.std()), 1e-6)
        return [(s - mean) / std for s in scores]

    def level(self, kind: str, z: float) -> str:
        limits = self.thresholds.get(kind)
        if limits is None:
            return ""
        return next((name for name, _ in LEVELS if z >= limits[name]), WEAK)

    def fits(self, kind: str, top_z: float) -> bool | None:
        """Whether the first result fits as right answers' first results do; None for a kind not calibrated."""
        limits = self.thresholds.get(kind)
        return None if limits is None else bool(top_z >= limits["fits"])


def catalog_sample(ids: Sequence[str], feature: Callable[[str], np.ndarray], size: int = SAMPLE) -> np.ndarray:
    """Unit features of ``size`` items drawn the same way every time."""
    chosen = np.random.default_rng(0).permutation(len(ids))[:size]
    rows = np.stack([feature(ids[i]) for i in sorted(chosen)]).astype(np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def right_answers(titles: dict[str, str], captions: dict[str, list], feature: Callable[[str], np.ndarray],
                  encode_texts: EncodeTexts, compose: Compose | None, calibration: bool
                  ) -> dict[str, RightAnswers]:
    """The known right answers of each kind, from the calibration half (``calibration``) or the other: text
    (a title, its item) and composed (a reference and a caption, its target)."""
    out = {}
    texts = [(title, item) for item, title in sorted(titles.items())
             if calibration_half(item, title) == calibration][:MAX_QUERIES]
    if texts:
        out["text"] = RightAnswers(encode_texts([t for t, _ in texts]), [i for _, i in texts])
    composed = [(reference, caption, target) for reference, entries in sorted(captions.items())
                for caption, target in entries if calibration_half(reference, caption) == calibration][:MAX_QUERIES]
    if composed and compose is not None:
        references = np.stack([feature(r) for r, _, _ in composed])
        out["composed"] = RightAnswers(compose(references, [c for _, c, _ in composed]), [t for _, _, t in composed])
    return out


def answer_z(levels_sample: np.ndarray, answers: RightAnswers, feature: Callable[[str], np.ndarray],
             top_score: TopScore) -> tuple[np.ndarray, np.ndarray]:
    """Each query's z-score of its right answer and of its first result."""
    probe = MatchLevels(levels_sample, {})
    own, first = [], []
    for query, answer in zip(answers.queries, answers.answers, strict=True):
        target = float(query @ (feature(answer) / max(float(np.linalg.norm(feature(answer))), 1e-12)))
        z_target, z_first = probe.z(query, [target, top_score(query)])
        own.append(z_target)
        first.append(z_first)
    return np.array(own), np.array(first)


def calibrate_levels(sample: np.ndarray, answers: dict[str, RightAnswers], feature: Callable[[str], np.ndarray],
                     top_score: TopScore) -> MatchLevels:
    """The thresholds of each kind from its right answers (the calibration half)."""
    thresholds = {}
    for kind, queries in answers.items():
        own, first = answer_z(sample, queries, feature, top_score)
        thresholds[kind] = {**{name: float(np.quantile(own, q)) for name, q in LEVELS},
                            "fits": float(np.quantile(first, FITS_QUANTILE))}
    return MatchLevels(sample, thresholds)
