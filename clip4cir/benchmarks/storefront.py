"""The storefront benchmark (``python scripts/benchmark.py storefront``): what the shipped demo tells a shopper,
measured on queries its settings were not chosen on.

Match levels and the "nothing fits" notice (clip4cir.retrieval.match_levels) are calibrated on one half of the
catalog's known right answers (titles to their images, the data set's captions to their targets); here, on the
other half: the level each right answer gets, and how often a right-answer query is told that nothing fits; and
how often queries for things the catalog does not hold (other products, nonsense) are told so. A change of
category said in a caption: composed queries from held-out references asking for another category in the
words shoppers use (truth: the category asked for), and the held-out captions of the catalog and the real
FashionIQ validation captions, whose targets never change category (truth: no switch). Proportions come with
95% Wilson intervals.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.retrieval.category_words import named_category
from clip4cir.retrieval.match_levels import LEVELS, WEAK, answer_z
from clip4cir.retrieval.search import SearchEngine
from clip4cir.retrieval.tuning import calibration_half

CONFIGS = {"full": {"k": 10}}
ANNOTATIONS = Path(__file__).resolve().parents[3] / "shared" / "fashioniq"  # beside the checkout
OFF_CATALOG = ("blue jeans", "white sneakers", "a leather handbag", "sunglasses", "a wool winter coat",
               "a red sports car", "a golden retriever", "a laptop computer", "a bowl of soup", "a wrist watch",
               "xqzv blorft wuggle 1234", "asdf", "hello", "the", "lorem ipsum dolor sit amet")
OFF_CHANGES = ("is a car", "is a pair of shoes", "xqzv blorft", "is a dog instead", "is a handbag")
SHOPPER_WORDS = {"dress": ("dress", "frock", "gown"), "shirt": ("shirt", "blouse", "button-up shirt"),
                 "toptee": ("t-shirt", "tee", "top")}
TEMPLATES = ("is a {new} instead of a {old}", "should be a {new}, not a {old}", "is a {new} rather than a {old}",
             "make it a {new}", "a {new} in the same colour")


def wilson(hits: int, n: int) -> list[float]:
    """A proportion's 95% Wilson interval, in percent."""
    if n == 0:
        return [0.0, 0.0]
    p, z = hits / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, 100 * (centre - half)), 1), round(min(100.0, 100 * (centre + half)), 1)]


def share(hits: int, n: int) -> dict:
    return {"percent": round(100 * hits / max(n, 1), 1), "interval": wilson(hits, n), "n": n}


def match_levels_held_out(engine: SearchEngine) -> dict:
    """The levels and notices of the held-out half of the right answers, and the notices of off-catalog queries."""
    levels = engine.match_levels()
    index = engine.index
    held = engine.known_answers(calibration=False)
    out = {}
    for kind, answers in held.items():
        own, first = answer_z(levels.sample, answers, index.feature, engine.top_score)
        named = [levels.level(kind, z) for z in own]
        out[kind] = {"queries": len(own), **{name: share(named.count(name), len(named))
                                              for name in [n for n, _ in LEVELS] + [WEAK]},
                     "told nothing fits": share(int(sum(levels.fits(kind, z) is False for z in first)), len(first))}
    texts = [engine.text_search(q, k=1) for q in OFF_CATALOG]
    references = sorted(index.captions)[:len(OFF_CHANGES) * 4]
    composed = [engine.composed_search(OFF_CHANGES[i % len(OFF_CHANGES)], reference_id=r, k=1, category="all")
                for i, r in enumerate(references)]
    out["off-catalog text"] = share(sum(r.fits is False for r in texts), len(texts))
    out["off-catalog composed"] = share(sum(r.fits is False for r in composed), len(composed))
    out["thresholds"] = levels.thresholds
    return out


def category_changes(engine: SearchEngine, annotations: Path, k: int) -> dict:
    """Cross-category queries honoured, and captions that keep the category left alone."""
    index = engine.index
    references = [r for r in sorted(index.captions) if not calibration_half(r, "")][:120]
    asked, honoured, in_category = 0, 0, 0
    for n, reference in enumerate(references):
        old = index.item(reference).categories[0]
        new = sorted(set(SHOPPER_WORDS) - {old})[n % 2]
        caption = TEMPLATES[n % len(TEMPLATES)].format(new=SHOPPER_WORDS[new][n % 3], old=SHOPPER_WORDS[old][0])
        result = engine.composed_search(caption, reference_id=reference, k=k)
        asked += 1
        honoured += result.category == new
        in_category += sum(new in h.categories for h in result.hits)
    kept = [(r, c) for r, entries in sorted(index.captions.items()) for c, _ in entries if not calibration_half(r, c)]
    switched = sum(engine.composed_search(c, reference_id=r, k=1).category != index.item(r).categories[0]
                   for r, c in kept)
    vocabulary = engine.category_vocabulary()
    real = []
    for path in sorted(annotations.glob("captions/cap.*.val.json")):
        real += [(path.name.split(".")[1], c) for t in json.loads(path.read_text()) for c in t["captions"]]
    real_switches = sum(1 for category, caption in real
                        if (found := named_category(caption, vocabulary)) and found[0] != category)
    return {"cross-category queries honoured": share(honoured, asked),
            "their results in the asked category": share(in_category, asked * k),
            "catalog captions switched wrongly": share(switched, len(kept)),
            "real FashionIQ val captions switched wrongly": share(real_switches, len(real)),
            "vocabulary": vocabulary}


def run_storefront(config: str, out: Path, work: str | None = None) -> dict:
    """Measure the demo's match levels and category changes; writes storefront.json and storefront.md."""
    from clip4cir.serving import service
    started = time.perf_counter()
    engine = service.load_engine(service.Options(device="cpu"))
    m = machine()
    report = {"config": config, "command": "python scripts/benchmark.py storefront", "machine": m["cpu"],
              "catalog": f"the demo's, {len(engine.index):,} items", "levels": match_levels_held_out(engine),
              "category": category_changes(engine, ANNOTATIONS, CONFIGS[config]["k"]),
              "seconds": round(time.perf_counter() - started, 1)}
    write_report(out, stem_for("storefront", config, "full"), report, markdown)
    return report


def _cell(s: dict) -> str:
    return f"{s['percent']}% [{s['interval'][0]}, {s['interval'][1]}] of {s['n']:,}"


def markdown(report: dict) -> str:
    levels, category = report["levels"], report["category"]
    lines = [f"{report['catalog']}; settings from the calibration half, measured on the other; 95% Wilson "
             f"intervals; command: `{report['command']}`.", "",
             "| right answers (held out) | strong match | good match | weak match | told nothing fits |",
             "|---|---|---|---|---|"]
    for kind in ("text", "composed"):
        if kind in levels:
            row = levels[kind]
            lines.append(f"| {kind} ({row['queries']} queries) | " + " | ".join(_cell(row[name]) for name in (
                "strong match", "good match", "weak match", "told nothing fits")) + " |")
    lines += ["", "| queries for what the catalog does not hold | told nothing fits |", "|---|---|",
              f"| text (other products, nonsense) | {_cell(levels['off-catalog text'])} |",
              f"| composed (a catalog reference, a change to another product or nonsense) | "
              f"{_cell(levels['off-catalog composed'])} |", "",
              "| a change of category | share |", "|---|---|"]
    lines += [f"| {name} | {_cell(category[name])} |" for name in (
        "cross-category queries honoured", "their results in the asked category",
        "catalog captions switched wrongly", "real FashionIQ val captions switched wrongly")]
    lines += ["", "Category words learned from the titles: " + ", ".join(
        f"{w} → {c}" for w, c in sorted(category["vocabulary"].items())) + "."]
    return "\n".join(lines) + "\n"

