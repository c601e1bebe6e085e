"""Beyond the Combiner (``python scripts/benchmark.py titles-reranking``): the reference's title put around the
caption ("{title} that {caption}", ``--title-template``) as a training component of both stages and at query time,
and a trained re-ranker of the first 50 candidates (``clip4cir train-reranker``), paired over seeds from the
pretrained base (``demo/base``) with the same pipeline without them.

Supervised rows (stage one and the Combiner trained as the recipe ablation trains them, on the synthetic ``demo``
catalog): the Sum and the Combiner, trained on captions alone or on titled captions; the captions-only Combiner
given titles at query time only; the title-trained Combiner on an uploaded reference, which has no title: the
caption alone, or the title of the catalog item that looks most like it; the Combiner with its first candidates
re-ranked by a re-ranker trained on its candidates for the training triplets. Zero-shot rows (no triplets): the
Sum of the base, catalog adaptation + Sum, lincir + Sum and catalog adaptation + lincir + Sum, each with and
without the titles at query time. Reported on the val queries of a FashionIQ- and a CIRR-layout catalog drawn
with another seed (never trained on); every row paired with its pair (the Combiner on captions alone, or the
same zero-shot row without titles) over the seeds, the interval combining the seeds' spread and the query
sample's. The template was chosen on a dev catalog by the earlier query-time measurement (benchmark/README.md).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from clip4cir.benchmarks.ablation import (
    BASE,
    BASELINE,
    STAGE_TWO_LR,
    components,
    held_out,
    run_stage_one,
    run_stage_two,
    summary,
)
from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.pipeline import percentiles_ms, timed
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.benchmarks.zero_shot import adapt, train_phi
from clip4cir.data.captions import TITLE_TEMPLATE, framed, title_frame
from clip4cir.data.sources import Source, SourceOptions, open_source
from clip4cir.data.sources.base import TitledCaptions
from clip4cir.data.synthetic import make_synthetic_cirr, make_synthetic_fashioniq
from clip4cir.models.combiner import load_combiner
from clip4cir.models.encoder_file import load_encoder
from clip4cir.models.features import encode_texts, gallery_features
from clip4cir.models.reranker import PARTS, load_reranker
from clip4cir.training.trainer import train_here
from combiner.reranking import RerankerConfig, RerankerTask

CONFIGS = {
    "smoke": {"size": "tiny", "test_size": "tiny", "cirr_size": "tiny", "seeds": [0, 1], "epochs": 1,
              "combiner_epochs": 2, "batch": 8, "combiner_batch": 16, "adapt_epochs": 1, "adapt_batch": 16,
              "phi_epochs": 1, "phi_batch": 16, "reranker_epochs": 2, "reranker_batch": 8},
    "full": {"size": "demo", "test_size": "heldout", "cirr_size": "demo", "seeds": [0, 1, 2, 3, 4], "epochs": 5,
             "combiner_epochs": 60, "batch": 64, "combiner_batch": 256, "adapt_epochs": 6, "adapt_batch": 128,
             "phi_epochs": 8, "phi_batch": 256, "reranker_epochs": 10, "reranker_batch": 64},
}
TRAIN_SEED, HELD_OUT_SEED = 0, 1  # the recipe ablation's catalogs
PHI = "lincir"  # the zero-shot φ of the best row without triplets (benchmark/zero-shot.md)
COMBINER = "Combiner"
RERANKED = "Combiner, its first 50 re-ranked by a trained re-ranker"
SUPERVISED_ROWS = {  # row → the row it is paired with
    "Sum": COMBINER, "Sum, trained with titles": COMBINER, COMBINER: COMBINER,
    "Combiner, titles at query time only": COMBINER, "Combiner, trained with titles": COMBINER,
    "Combiner, trained with titles; uploaded reference, caption alone": COMBINER,
    "Combiner, trained with titles; uploaded reference, its nearest item's title": COMBINER, RERANKED: COMBINER,
}
ZERO_SHOT = ("Sum, no training", "catalog adaptation, Sum", f"{PHI} + Sum", f"catalog adaptation + {PHI} + Sum")


def titled(source: Source, titles: dict[str, str] | None = None) -> Source:
    """The source with its references' titles (or ``titles``) put around the captions."""
    return TitledCaptions(source, TITLE_TEMPLATE, titles)


def nearest_titles(encoder_path: Path, source: Source, cache: Path) -> dict[str, str]:
    """Each val image's stand-in title as if it were uploaded: the title of the other image that looks most like
    it (by the encoder's image features)."""
    encoder, names = load_encoder(encoder_path), source.titles()
    out = {}
    for category in source.categories() or [None]:
        ids, features = gallery_features(encoder, source, "val", category, cache, 64, 0, False)
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        scores = features @ features.T
        scores.fill_diagonal_(-2.0)
        out.update({image_id: names.get(ids[int(j)], "") for image_id, j in zip(ids, scores.argmax(1), strict=True)})
    return out


def catalogs_of(roots: dict[str, Path]) -> dict[str, dict[str, Source]]:
    """Per held-out catalog, its source read plainly and with titles."""
    return {name: {"plain": open_source(root), "titled": titled(open_source(root))} for name, root in roots.items()}


def run_reranker(data: Path, encoder: Path, combiner: Path, out: Path, seed: int, cfg: dict, workers: int,
                 cache: Path) -> Path:
    """A re-ranker of the Combiner's first candidates, trained on the training catalog's triplets (the best of its
    epochs on the catalog's val split)."""
    train_here(RerankerTask, RerankerConfig(
        source=SourceOptions(str(data)), output=str(out), clip_checkpoint=str(encoder), combiner=str(combiner),
        seed=seed, epochs=cfg["reranker_epochs"], batch_size=cfg["reranker_batch"], lr=STAGE_TWO_LR, workers=workers,
        quiet=True, save_best=True, val_every=5, cache_dir=str(cache), device="cpu"))
    return out / "best.safetensors"


def supervised_rows(data: Path, tmp: Path, seed: int, sources: dict, cfg: dict, workers: int) -> dict[str, dict]:
    """One seed's supervised rows on every held-out catalog: row → catalog → held-out result."""
    cache, runs = tmp / "features", {}
    for name, template in (("plain", None), ("titled", TITLE_TEMPLATE)):
        encoder = run_stage_one(data, tmp / f"s1-{seed}-{name}", seed, components(BASELINE), cfg, workers, template)
        combiner = run_stage_two(data, encoder, tmp / f"s2-{seed}-{name}", seed, components(BASELINE), cfg, workers,
                                 tmp / f"s2-cache-{seed}-{name}", template)
        runs[name] = encoder, combiner
    (e, c), (et, ct) = runs["plain"], runs["titled"]
    reranker = run_reranker(data, e, c, tmp / f"rr-{seed}", seed, cfg, workers, tmp / f"s2-cache-{seed}-plain")
    out: dict[str, dict] = {}
    for catalog, s in sources.items():
        nearest = titled(s["plain"], nearest_titles(et, s["plain"], cache))
        for row, args in (("Sum", (e, None, s["plain"])), ("Sum, trained with titles", (et, None, s["titled"])),
                          (COMBINER, (e, c, s["plain"])), ("Combiner, titles at query time only", (e, c, s["titled"])),
                          ("Combiner, trained with titles", (et, ct, s["titled"])),
                          ("Combiner, trained with titles; uploaded reference, caption alone", (et, ct, s["plain"])),
                          ("Combiner, trained with titles; uploaded reference, its nearest item's title",
                           (et, ct, nearest))):
            out.setdefault(row, {})[catalog] = held_out(*args, cache)
        out.setdefault(RERANKED, {})[catalog] = held_out(e, c, s["plain"], cache, reranker_path=reranker)
    return out


def zero_shot_rows(data: Path, tmp: Path, seed: int, sources: dict, cfg: dict, workers: int) -> dict[str, dict]:
    """One seed's zero-shot rows, each without and with titles: row → catalog → held-out result."""
    cache = tmp / "features"  # keyed by each encoder's fingerprint: the base's features computed once
    pairs = data / "pairs.jsonl"
    adapted = adapt(pairs, tmp / f"adapt-{seed}", seed, cfg, workers)
    phis = {encoder: train_phi(pairs, encoder, PHI, tmp / f"phi-{seed}-{n}", seed, cfg, workers)
            for n, encoder in enumerate((BASE, adapted))}
    setups = {ZERO_SHOT[0]: (BASE, None), ZERO_SHOT[1]: (adapted, None), ZERO_SHOT[2]: (BASE, phis[BASE]),
              ZERO_SHOT[3]: (adapted, phis[adapted])}
    out: dict[str, dict] = {}
    for row, (encoder, phi) in setups.items():
        for catalog, s in sources.items():
            out.setdefault(row, {})[catalog] = held_out(encoder, None, s["plain"], cache, phi)
            out.setdefault(f"{row}, with titles", {})[catalog] = held_out(encoder, None, s["titled"], cache, phi)
    return out


def query_cost(encoder_path: Path, combiner_path: Path, reranker_path: Path, repeats: int = 100) -> dict:
    """Milliseconds (p50) of a composed query's text feature and Combiner, the caption alone and with the title,
    and of re-ranking its first candidates (their features at hand, as the index holds them)."""
    encoder = load_encoder(encoder_path)
    combiner = load_combiner(combiner_path, encoder=encoder)[0]
    reranker = load_reranker(reranker_path, encoder=encoder)
    reference = torch.randn(1, encoder.dim)
    caption = "is blue and has shorter sleeves"
    text = framed(caption, title_frame(TITLE_TEMPLATE, "Red striped knee-length dress with long sleeves"))
    parts, candidates = torch.randn(1, len(PARTS), encoder.dim), torch.randn(1, reranker.depth, encoder.dim)
    with torch.inference_mode():
        cost = {key: percentiles_ms(timed(lambda t=t: combiner.combine(reference, encode_texts(encoder, [t])),
                                          repeats))["p50_ms"] for key, t in (("caption_ms", caption),
                                                                             ("titled_ms", text))}
        cost["rerank_ms"] = percentiles_ms(timed(lambda: reranker.rerank(parts, candidates,
                                                                         torch.rand(1, reranker.depth)),
                                                 repeats))["p50_ms"]
    return cost


def pair_of(row: str) -> str:
    return SUPERVISED_ROWS.get(row) or row.removesuffix(", with titles")


def tables(rows: dict[str, list[dict]], catalogs: list[str]) -> dict:
    """Per catalog, each row's summary over the seeds, paired with the row it is compared with."""
    return {catalog: {row: summary([r[catalog] for r in runs], [r[catalog] for r in rows[pair_of(row)]])
                      for row, runs in rows.items()} for catalog in catalogs}


def share_of_the_way(table: dict, zero_shot_row: str) -> float | None:
    """How far a zero-shot row goes from the untrained Sum to the supervised Combiner, in avg R@10 (1: all); None
    when the Combiner is not ahead of the Sum (no way to go)."""
    start, end = table[ZERO_SHOT[0]]["average/R@10"]["mean"], table[COMBINER]["average/R@10"]["mean"]
    return (table[zero_shot_row]["average/R@10"]["mean"] - start) / (end - start) if end > start else None


def run_titles_reranking(config: str, out: Path, work: str | None = None, workers: int = 2) -> dict:
    """Run the benchmark of ``CONFIGS[config]``; writes titles-reranking.json and .md into ``out``."""
    cfg, started = CONFIGS[config], time.perf_counter()
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        data = tmp / "train-catalog"
        make_synthetic_fashioniq(data, cfg["size"], seed=TRAIN_SEED)
        roots = {"fashioniq": tmp / "held-out-fashioniq", "cirr": tmp / "held-out-cirr"}
        make_synthetic_fashioniq(roots["fashioniq"], cfg["test_size"], seed=HELD_OUT_SEED)
        make_synthetic_cirr(roots["cirr"], cfg["cirr_size"], seed=HELD_OUT_SEED)
        sources = catalogs_of(roots)
        for seed in cfg["seeds"]:
            print(f"titles-reranking: seed {seed}", flush=True)
            for part in (supervised_rows, zero_shot_rows):
                for row, result in part(data, tmp, seed, sources, cfg, workers).items():
                    rows.setdefault(row, []).append(result)
        last = cfg["seeds"][-1]
        cost = query_cost(tmp / f"s1-{last}-plain" / "best.safetensors", tmp / f"s2-{last}-plain" / "best.safetensors",
                          tmp / f"rr-{last}" / "best.safetensors")
    results = tables(rows, list(roots))
    m = machine()
    report = {"config": config, "command": f"python scripts/benchmark.py titles-reranking --config {config}",
              "machine": f"{m['cpu']}, {m['cores']} cores", "seeds": cfg["seeds"], "template": TITLE_TEMPLATE,
              "settings": cfg, "tables": results, "query_cost": cost,
              "queries": {c: sum(len(r) for r in rows[COMBINER][0][c]["ranks"].values()) for c in roots},
              "share_of_the_way": {c: {row: share_of_the_way(results[c], row) for row in
                                       (ZERO_SHOT[3], f"{ZERO_SHOT[3]}, with titles")} for c in roots},
              "seconds": round(time.perf_counter() - started, 1)}
    write_report(out, stem_for("titles-reranking", config, "full"), report, markdown)
    return report


def markdown(report: dict) -> str:
    def cell(stats: dict, key: str) -> str:
        return f"{stats[key]['mean']:.2f} ± {stats[key]['std']:.2f}"

    def delta(stats: dict) -> str:
        p = stats["paired"]["average/R@10"]
        return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]"
    lines = [f"Machine: {report['machine']}; command: `{report['command']}`; seeds {report['seeds']}; every model "
             f"from the pretrained base `demo/base`; the title template “{report['template']}”. Trained on the "
             f"synthetic `{report['settings']['size']}` catalog (seed {TRAIN_SEED}); reported on the val queries "
             f"of catalogs drawn with seed {HELD_OUT_SEED} (FashionIQ layout: "
             f"{report['queries']['fashioniq']:,} queries; CIRR layout: {report['queries']['cirr']:,}). Δ: the "
             f"mean paired difference in avg R@10 to the row named, 95% interval over the seeds' and the queries' "
             f"standard errors.", ""]
    for catalog, title in (("fashioniq", "FashionIQ layout"), ("cirr", "CIRR layout")):
        lines += [f"### {title}", "", "| row | avg R@10 | avg R@50 | paired with | Δ avg R@10 [95% CI] |",
                  "|---|---|---|---|---|"]
        for row, stats in report["tables"][catalog].items():
            pair = pair_of(row)
            lines.append(f"| {row} | {cell(stats, 'average/R@10')} | {cell(stats, 'average/R@50')} | "
                         + ("—" if pair == row else pair) + " | " + ("—" if pair == row else delta(stats)) + " |")
        lines.append("")
    share, cost = report["share_of_the_way"], report["query_cost"]

    def percent(value: float | None) -> str:
        return "n/a (the Combiner is not ahead of the Sum)" if value is None else f"{100 * value:.0f}%"
    lines += [f"Catalog adaptation + {PHI} + Sum goes "
              + "; ".join(f"{c}: {percent(v[ZERO_SHOT[3]])} without titles, "
                          f"{percent(v[ZERO_SHOT[3] + ', with titles'])} with them"
                          for c, v in share.items())
              + " of the way from the untrained Sum to the supervised Combiner (captions alone). A composed "
              f"query's text feature and Combiner take {cost['caption_ms']} ms with the caption alone and "
              f"{cost['titled_ms']} ms with the title around it (one text encoding either way); re-ranking its "
              f"first 50 candidates {cost['rerank_ms']} ms more (p50, cir-tiny, this CPU)."]
    return "\n".join(lines) + "\n"
