"""The no-triplets benchmark (``python scripts/benchmark.py zero-shot``): what a shop without triplets gets, beside
what triplets buy, all from the shipped pretrained base (``demo/base``).

Trained on one synthetic FashionIQ-layout catalog (its train split: images and titles for the zero-shot methods and
catalog adaptation, which choose their epoch on its held-out images without any triplet; its triplets for the
supervised pipeline, which chooses its epoch on its val triplets); reported on the val queries of three catalogs
drawn with another seed and never seen (FashionIQ, CIRR and CIRCO layouts; CIRCO's with mAP@K over several ground
truths a query). Rows: the Sum of the base's features without training; each φ (``pic2word``: from images,
``lincir``: from titles), its queries alone and with the Sum query added (the Sum's weight chosen on dev catalogs of
a third seed, from the first seed's φ); catalog adaptation (image-text training on the titles) with the Sum and with
each φ (alone and + Sum); CLIP4Cir trained on triplets mined from the titles (clip4cir.training.triplet_mining;
stage one with the Sum, and with the Combiner); and the supervised CLIP4Cir pipeline on the catalog's own triplets
(stage one, then the Combiner). Mean ± std over seeds; φ's training time and a query's cost beside a text search's.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.pipeline import percentiles_ms, timed
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.data.sources import SourceOptions, open_source
from clip4cir.data.synthetic import make_synthetic_circo, make_synthetic_cirr, make_synthetic_fashioniq
from clip4cir.evaluation.composed import evaluate
from clip4cir.models.combiner import combining_function
from clip4cir.models.encoder_file import load_encoder
from clip4cir.models.pseudo_tokens import zero_shot_queries
from clip4cir.serving.demo import DEMO_DIR
from clip4cir.training.pairs import PairsConfig, PairsTask
from clip4cir.training.stage_one import StageOneConfig, StageOneTask
from clip4cir.training.textual_inversion import METHODS, PhiConfig, PhiTask
from clip4cir.training.trainer import train_here
from clip4cir.training.triplet_mining import mine_triplets, plan_triplets
from combiner.stage_two import StageTwoConfig, StageTwoTask

BASE = DEMO_DIR / "base" / "encoder.safetensors"
TRAIN_SEED, HELD_OUT_SEED = 11, 7  # the held-out catalogs are those the base was measured on: never trained on
DEV_SEED = 5  # the catalogs the Sum's weight in φ + Sum queries is chosen on (neither trained nor reported on)
SUM_WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
CONFIGS = {  # size: the training catalog (small: enough titles to mine); held_out: the catalogs reported on
    "smoke": {"size": "small", "held_out": "tiny", "seeds": [0], "phi_epochs": 2, "phi_batch": 16, "adapt_epochs": 1,
              "adapt_batch": 16, "epochs": 1, "batch": 8, "combiner_epochs": 2, "combiner_batch": 16},
    "full": {"size": "demo", "held_out": "demo", "seeds": [0, 1, 2], "phi_epochs": 8, "phi_batch": 256,
             "adapt_epochs": 6, "adapt_batch": 128, "epochs": 12, "batch": 64, "combiner_epochs": 60,
             "combiner_batch": 256},
}
PHI_LR, ADAPT_LR, STAGE_ONE_LR, STAGE_TWO_LR = 1e-3, 1e-4, 1e-4, 1e-3
SUPERVISED = "supervised CLIP4Cir (stage one + Combiner)"
MINED_SUM, MINED_COMBINER = "mined title triplets, stage one, Sum", "mined title triplets, stage one + Combiner"
TRIPLETS_USED = {SUPERVISED: "the catalog's", MINED_SUM: "mined from titles", MINED_COMBINER: "mined from titles"}


def train_phi(pairs: Path, encoder: Path, method: str, out: Path, seed: int, cfg: dict, workers: int) -> Path:
    train_here(PhiTask, PhiConfig(source=SourceOptions(str(pairs)), output=str(out), clip_checkpoint=str(encoder),
                                  method=method, seed=seed, epochs=cfg["phi_epochs"], batch_size=cfg["phi_batch"],
                                  lr=PHI_LR, workers=workers, quiet=True, save_best=True, device="cpu"))
    return out / "best.safetensors"


def adapt(pairs: Path, out: Path, seed: int, cfg: dict, workers: int) -> Path:
    train_here(PairsTask, PairsConfig(source=SourceOptions(str(pairs)), output=str(out), clip_checkpoint=str(BASE),
                                      seed=seed, epochs=cfg["adapt_epochs"], batch_size=cfg["adapt_batch"],
                                      lr=ADAPT_LR, workers=workers, quiet=True, save_best=True, device="cpu"))
    return out / "best.safetensors"


def supervised(data: Path, out: Path, seed: int, cfg: dict, workers: int) -> tuple[Path, Path]:
    train_here(StageOneTask, StageOneConfig(source=SourceOptions(str(data)), output=str(out / "stage1"),
                                            clip_checkpoint=str(BASE), seed=seed, epochs=cfg["epochs"],
                                            batch_size=cfg["batch"], lr=STAGE_ONE_LR, workers=workers, quiet=True,
                                            save_best=True, device="cpu"))
    encoder = out / "stage1" / "best.safetensors"
    train_here(StageTwoTask, StageTwoConfig(source=SourceOptions(str(data)), output=str(out / "stage2"),
                                            clip_checkpoint=str(encoder), seed=seed, epochs=cfg["combiner_epochs"],
                                            batch_size=cfg["combiner_batch"], lr=STAGE_TWO_LR, workers=workers,
                                            quiet=True, save_best=True, val_every=5, cache_dir=str(out / "cache"),
                                            device="cpu"))
    return encoder, out / "stage2" / "best.safetensors"


def held_out(encoder_path: Path, catalogs: dict[str, Path], features: Path, phi: Path | None = None,
             combiner: Path | None = None, sum_weight: float = 0.0) -> dict:
    """Recall on each held-out catalog's val queries, composed as the row says (φ's queries with the Sum query ×
    ``sum_weight`` added); the galleries' features cached in ``features`` (each encoder's computed once)."""
    encoder = load_encoder(encoder_path)
    mode = "phi" if phi is not None else "combiner" if combiner is not None else "sum"
    combine = combining_function(encoder, combiner and str(combiner), mode, phi and str(phi), sum_weight)
    return {name: evaluate(encoder, open_source(root), combine=combine, cache_dir=features, progress=False)["average"]
            for name, root in catalogs.items()}


def choose_sum_weight(encoder_path: Path, phi: Path, dev: dict[str, Path], features: Path) -> dict:
    """The Sum's weight in φ + Sum queries: of ``SUM_WEIGHTS``, the one with the best mean R@10 over the dev
    catalogs (FashionIQ's average, CIRR's), and every weight's score."""
    scores = {w: statistics.mean(m["R@10"] for m in
                                 held_out(encoder_path, dev, features, phi=phi, sum_weight=w).values())
              for w in SUM_WEIGHTS}
    return {"chosen": max(scores, key=scores.get), "dev R@10": {f"{w:g}": v for w, v in scores.items()}}


def query_cost(encoder_path: Path, phi: Path, sum_weight: float, repeats: int = 50) -> dict:
    """Milliseconds per single query (p50): a text search's text feature, against a zero-shot composed query's
    (φ's forward pass and the prompt's text feature), alone and with the Sum query (the caption's text feature)."""
    encoder = load_encoder(encoder_path)
    reference = torch.randn(1, encoder.dim)

    def p50(call) -> float:
        return percentiles_ms(timed(call, repeats))["p50_ms"]
    cost = {}
    with torch.inference_mode():
        cost["text_ms"] = p50(lambda: encoder.encode_text(["is red with shorter sleeves"]))
        for key, weight in (("zero_shot_ms", 0.0), ("zero_shot_sum_ms", sum_weight)):
            queries = zero_shot_queries(phi, encoder, weight)
            cost[key] = p50(partial(queries, reference, ["is red with shorter sleeves"]))
    return cost


def summary(values: list[dict]) -> dict:
    keys = [(catalog, metric) for catalog, metrics in values[0].items() for metric in metrics]
    return {f"{c}/{m}": {"mean": statistics.mean(v[c][m] for v in values),
                         "std": statistics.stdev(v[c][m] for v in values) if len(values) > 1 else 0.0,
                         "values": [v[c][m] for v in values]} for c, m in keys}


def markdown(report: dict) -> str:
    def cell(stats: dict, key: str) -> str:
        return f"{stats[key]['mean']:.2f} ± {stats[key]['std']:.2f}"
    lines = [f"Machine: {report['machine']}; command: `{report['command']}`; seeds {report['seeds']}; all from the "
             f"base `demo/base` (cir-tiny pretrained on image-text pairs here). Trained on a synthetic "
             f"FashionIQ-layout catalog `{report['size']}` (seed {TRAIN_SEED}); reported on the val queries of "
             f"catalogs drawn with seed {HELD_OUT_SEED} (never trained on).", "",
             "| method | triplets used | FashionIQ avg R@10 | FashionIQ avg R@50 | CIRR R@10 | CIRR R@50 "
             "| CIRCO-layout mAP@10 | CIRCO-layout mAP@50 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        circo = f"{cell(row, 'circo/mAP@10')} | {cell(row, 'circo/mAP@50')}" if "circo/mAP@10" in row else "- | -"
        lines.append(f"| {name} | {TRIPLETS_USED.get(name, 'none')} | {cell(row, 'fashioniq/R@10')} | "
                     f"{cell(row, 'fashioniq/R@50')} | {cell(row, 'cirr/R@10')} | {cell(row, 'cirr/R@50')} | {circo} |")
    cost = report["query_cost"]
    lines += ["", f"Training φ: {', '.join(f'{m} {s:.0f} s' for m, s in report['phi_seconds'].items())} (mean per "
              f"seed); mining triplets from the titles {report['mining_seconds']:.0f} s ({report['mined']} "
              f"triplets, train / val, mean per seed). One query: a text search's text feature {cost['text_ms']} ms, "
              f"a zero-shot composed query "
              f"(φ and the prompt's text feature) {cost['zero_shot_ms']} ms, with the Sum query added (the "
              f"caption's text feature too) {cost['zero_shot_sum_ms']} ms (p50, cir-tiny, this CPU).",
              "", f"The Sum's weight in the \"+ Sum\" rows (query = normalise(φ's query + w × the Sum query)), chosen "
              f"from {', '.join(f'{w:g}' for w in SUM_WEIGHTS)} by the mean R@10 of the first seed's φ on the "
              f"base over catalogs drawn with seed {DEV_SEED} (neither trained nor reported on): "
              + "; ".join(f"{m} w = {c['chosen']:g} (dev R@10 "
                          + ", ".join(f"{w}: {v:.1f}" for w, v in c["dev R@10"].items()) + ")"
                          for m, c in report["sum_weights"].items()) + "."]
    return "\n".join(lines) + "\n"


def run_zero_shot(config: str, out: Path, work: str | None = None, workers: int = 2) -> dict:
    """Run the benchmark of ``CONFIGS[config]``; writes zero-shot.json and zero-shot.md into ``out``."""
    cfg = CONFIGS[config]
    started = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    phi_seconds: dict[str, list[float]] = {m: [] for m in METHODS.names()}
    mining_seconds: list[float] = []
    mined: list[dict[str, int]] = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        data = tmp / "train-catalog"
        make_synthetic_fashioniq(data, cfg["size"], seed=TRAIN_SEED)
        catalogs = {"fashioniq": tmp / "held-out-fashioniq", "cirr": tmp / "held-out-cirr",
                    "circo": tmp / "held-out-circo"}
        make_synthetic_fashioniq(catalogs["fashioniq"], cfg["held_out"], seed=HELD_OUT_SEED)
        make_synthetic_cirr(catalogs["cirr"], cfg["held_out"], seed=HELD_OUT_SEED)
        make_synthetic_circo(catalogs["circo"], cfg["held_out"], seed=HELD_OUT_SEED)
        dev = {"fashioniq": tmp / "dev-fashioniq", "cirr": tmp / "dev-cirr"}
        make_synthetic_fashioniq(dev["fashioniq"], cfg["held_out"], seed=DEV_SEED)
        make_synthetic_cirr(dev["cirr"], cfg["held_out"], seed=DEV_SEED)
        sum_weights: dict[str, dict] = {}
        features = tmp / "features"
        pairs = data / "pairs.jsonl"
        rows["Sum, no training"] = [held_out(BASE, catalogs, features)] * len(cfg["seeds"])
        for seed in cfg["seeds"]:
            print(f"zero-shot: seed {seed}", flush=True)
            adapted = adapt(pairs, tmp / f"adapt-{seed}", seed, cfg, workers)
            rows.setdefault("catalog adaptation, Sum", []).append(held_out(adapted, catalogs, features))
            for method in METHODS.names():
                for name, encoder in ((method, BASE), (f"catalog adaptation + {method}", adapted)):
                    t0 = time.perf_counter()
                    phi = train_phi(pairs, encoder, method, tmp / f"phi-{seed}-{name.replace(' ', '-')}", seed,
                                    cfg, workers)
                    if encoder == BASE:
                        phi_seconds[method].append(time.perf_counter() - t0)
                        base_phi = method, phi
                        if method not in sum_weights:  # chosen once, from the first seed's φ on the base
                            sum_weights[method] = choose_sum_weight(BASE, phi, dev, features)
                    rows.setdefault(name, []).append(held_out(encoder, catalogs, features, phi=phi))
                    rows.setdefault(f"{name} + Sum", []).append(
                        held_out(encoder, catalogs, features, phi=phi, sum_weight=sum_weights[method]["chosen"]))
            t0 = time.perf_counter()
            source = open_source(str(pairs))
            counts = mine_triplets(load_encoder(BASE), source, plan_triplets(source, seed=seed),
                                   data / f"mined-{seed}.jsonl", workers=workers, progress=False)
            mining_seconds.append(time.perf_counter() - t0)
            mined.append(counts)
            stage_one, combiner = supervised(data / f"mined-{seed}.jsonl", tmp / f"mined-{seed}", seed, cfg, workers)
            rows.setdefault(MINED_SUM, []).append(held_out(stage_one, catalogs, features))
            rows.setdefault(MINED_COMBINER, []).append(held_out(stage_one, catalogs, features, combiner=combiner))
            stage_one, combiner = supervised(data, tmp / f"supervised-{seed}", seed, cfg, workers)
            rows.setdefault(SUPERVISED, []).append(held_out(stage_one, catalogs, features, combiner=combiner))
        cost = query_cost(BASE, base_phi[1], sum_weights[base_phi[0]]["chosen"])
    m = machine()
    report = {"config": config, "command": f"python scripts/benchmark.py zero-shot --config {config}",
              "machine": f"{m['cpu']}, {m['cores']} cores", "seeds": cfg["seeds"], "size": cfg["size"],
              "settings": {**cfg, "phi_lr": PHI_LR, "adapt_lr": ADAPT_LR, "stage_one_lr": STAGE_ONE_LR,
                           "stage_two_lr": STAGE_TWO_LR},
              "rows": {name: summary(values) for name, values in rows.items()},
              "phi_seconds": {k: statistics.mean(v) for k, v in phi_seconds.items()}, "query_cost": cost,
              "sum_weights": sum_weights,
              "mining_seconds": statistics.mean(mining_seconds),
              "mined": " / ".join(f"{statistics.mean(c[k] for c in mined):,.0f}" for k in mined[0]),
              "seconds": round(time.perf_counter() - started, 1)}
    write_report(out, stem_for("zero-shot", config, "full"), report, markdown)
    return report
