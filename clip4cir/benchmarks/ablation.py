"""The recipe ablation (``python scripts/benchmark.py ablation``): every variant fine-tuned from the same pretrained
base (``demo/base``, where users start: a pretrained CLIP), with the same seed, epochs, batch, data and number of
optimizer steps (asserted), over several seeds; the best epoch chosen on the training catalog's val split, the
numbers reported on a held-out catalog generated with another seed (never seen while choosing).

Stage one: CLIP4Cir's recipe, each component of ``plus`` alone, the paper's caption augmentation switched off,
and ``plus``; each evaluated with the Sum. Stage two: on the ``clip4cir`` stage-one encoder of the same seed,
CLIP4Cir's Combiner recipe, each component alone (caption augmentation switched off), and ``plus``; and the
whole pipelines (clip4cir then clip4cir, plus then plus). Each variant is compared with ``clip4cir`` of the same
seed: the mean paired difference with a 95% interval over the seeds' spread and the held-out query sample's (a
bootstrap over queries). Writes ``ablation.json`` and ``ablation.md``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.paired import paired_interval, query_sampling_se
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.data.sources import Source, SourceOptions, open_source
from clip4cir.data.synthetic import make_synthetic_fashioniq
from clip4cir.evaluation.composed import rankings_of, summarize
from clip4cir.evaluation.ranking import RECALL_KS
from clip4cir.models.combiner import combining_function
from clip4cir.models.encoder_file import load_encoder
from clip4cir.models.reranker import load_reranker
from clip4cir.serving.demo import DEMO_DIR
from clip4cir.training.checkpointing import read_metrics
from clip4cir.training.recipes import RECIPES, STAGE_TWO_ONLY
from clip4cir.training.stage_one import StageOneConfig, StageOneTask
from clip4cir.training.trainer import train_here
from combiner.stage_two import StageTwoConfig, StageTwoTask

CONFIGS = {
    "smoke": {"size": "tiny", "test_size": "tiny", "seeds": [0, 1], "epochs": 1, "combiner_epochs": 2, "batch": 8,
              "combiner_batch": 16},
    "full": {"size": "demo", "test_size": "heldout", "seeds": [0, 1, 2, 3, 4], "epochs": 5, "combiner_epochs": 60,
             "batch": 64, "combiner_batch": 256},
}
BASE = DEMO_DIR / "base" / "encoder.safetensors"  # the pretrained base (clip4cir.commands.make_base_model)
STAGE_ONE_LR, STAGE_TWO_LR = 1e-4, 1e-3  # the demo's rates from the base (chosen on the demo's val split)
BASELINE = "clip4cir"
PAPER_COMPONENTS_OFF = ("caption_augmentation",)  # the paper's own components, each measured switched off


def components(recipe: str, only: str | None = None, value=None) -> dict:
    """The settings of a variant: a recipe, or the clip4cir recipe with one component set (plus's value unless
    ``value``)."""
    if only is None:
        return {"recipe": recipe}
    return {"recipe": BASELINE, only: asdict(RECIPES["plus"])[only] if value is None else value}


def variants(stage: int) -> list[tuple[str, dict]]:
    """(name, settings) of the variants of a stage: clip4cir, each plus component that differs from it alone, each
    of the paper's own components switched off, and plus."""
    plus, paper = asdict(RECIPES["plus"]), asdict(RECIPES[BASELINE])
    changed = [c for c, v in plus.items() if v != paper[c] and (stage == 2 or c not in STAGE_TWO_ONLY)]
    return [(BASELINE, components(BASELINE))] + \
        [(f"+ {c.replace('_', ' ')}", components(BASELINE, c)) for c in changed] + \
        [(f"- {c.replace('_', ' ')}", components(BASELINE, c, False)) for c in PAPER_COMPONENTS_OFF] + \
        [("plus", components("plus"))]


def run_facts(run: Path) -> dict:
    """What the ablation keeps of a run: its median seconds per epoch and its optimizer steps in all."""
    records = read_metrics(run / "metrics.jsonl")
    return {"seconds_per_epoch": statistics.median(r["seconds"] for r in records), "steps": records[-1]["step"]}


def check_equal_steps(results: dict, seed: int, stage: str) -> None:
    """Every variant of a stage must have taken the same number of optimizer steps (the same budget)."""
    steps = {name: runs[-1]["steps"] for name, runs in results.items() if runs}
    if len(set(steps.values())) != 1:
        raise RuntimeError(f"seed {seed}, {stage}: the variants took different numbers of steps {steps}")


def run_stage_one(data: Path, out: Path, seed: int, settings: dict, cfg: dict, workers: int,
                  titles: str | None = None) -> Path:
    """Stage one from the base (captions in the ``titles`` template when given); returns the best epoch's file."""
    config = StageOneConfig(source=SourceOptions(str(data), title_template=titles), output=str(out),
                            clip_checkpoint=str(BASE), seed=seed, epochs=cfg["epochs"], batch_size=cfg["batch"],
                            lr=STAGE_ONE_LR, workers=workers,
                            quiet=True, save_best=True, device="cpu", **settings)
    train_here(StageOneTask, config)
    return out / "best.safetensors"


def run_stage_two(data: Path, encoder: Path, out: Path, seed: int, settings: dict, cfg: dict, workers: int,
                  cache: Path, titles: str | None = None) -> Path:
    """The Combiner on ``encoder`` (captions in the ``titles`` template when given); returns the best epoch's file."""
    config = StageTwoConfig(source=SourceOptions(str(data), title_template=titles), output=str(out),
                            clip_checkpoint=str(encoder), seed=seed, epochs=cfg["combiner_epochs"],
                            batch_size=cfg["combiner_batch"],
                            lr=STAGE_TWO_LR, workers=workers, quiet=True, save_best=True, val_every=5,
                            cache_dir=str(cache), device="cpu", **settings)
    train_here(StageTwoTask, config)
    return out / "best.safetensors"


def held_out(encoder_path: Path, combiner_path: Path | None, test_data: Path | Source, cache: Path,
             phi_path: Path | None = None, reranker_path: Path | None = None) -> dict:
    """The metrics of a chosen model (with its Combiner or φ, else the Sum; its first candidates re-ranked by the
    re-ranker when given) on the held-out catalog (its val split: items never seen) and, per category, the rank
    of each query's target (what the query bootstrap resamples); gallery features cached per encoder, since every
    stage-two variant of a seed ranks with the same one."""
    encoder = load_encoder(encoder_path)
    mode = "phi" if phi_path else "combiner" if combiner_path else "sum"
    combine = combining_function(encoder, combiner_path and str(combiner_path), mode, phi_path and str(phi_path))
    source = test_data if isinstance(test_data, Source) else open_source(test_data)
    reranker = load_reranker(reranker_path, encoder=encoder) if reranker_path else None
    rankings = rankings_of(encoder, source, source.protocol.val_split, combine, cache, progress=False,
                           reranker=reranker)
    return {"metrics": summarize(rankings, source.protocol),
            "ranks": {r.name: r.ranks.tolist() for r in rankings}}


def hits(run: dict, k: int) -> dict:
    """Per category, 1 for each query whose target ranks in the top ``k``."""
    return {name: [int(r < k) for r in ranks] for name, ranks in run["ranks"].items()}


def summary(runs: list[dict], baseline: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every metric and of the seconds per epoch; against the
    baseline's runs of the same seeds, the paired differences of avg R@10 and R@50 with their 95% intervals (the
    seeds' spread and the query sample's, from a bootstrap over queries), and, for runs that record their training
    (:func:`run_facts`), the time per epoch as a ratio (the median over seeds: a seed that shared the machine with
    other work does not sway it) and the steps."""
    keys = [(group, metric) for group, values in runs[0]["metrics"].items() if isinstance(values, dict)
            for metric in values]
    out = {f"{g}/{m}": [r["metrics"][g][m] for r in runs] for g, m in keys}
    trained = "seconds_per_epoch" in runs[0]
    if trained:
        out["seconds_per_epoch"] = [r["seconds_per_epoch"] for r in runs]
    table = {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
             for k, v in out.items()}
    table["paired"] = {}
    for k in RECALL_KS:
        metric = f"average/R@{k}"
        query_se = query_sampling_se([hits(r, k) for r in runs], [hits(b, k) for b in baseline])
        table["paired"][metric] = paired_interval(out[metric], [b["metrics"]["average"][f"R@{k}"] for b in baseline],
                                                  query_se)
    if trained:
        table["paired"]["time_ratio"] = statistics.median(r["seconds_per_epoch"] / b["seconds_per_epoch"]
                                                          for r, b in zip(runs, baseline, strict=True))
        table["steps"] = [r["steps"] for r in runs]
    return table


def beats_baseline(stats: dict) -> bool:
    """Whether a variant's paired 95% interval of avg R@10 lies above zero."""
    return stats["paired"]["average/R@10"]["low"] > 0


def markdown(report: dict) -> str:
    categories = ("dress", "shirt", "toptee")

    def cell(stats: dict, key: str) -> str:
        s = stats[key]
        return f"{s['mean']:.2f} ± {s['std']:.2f}"

    def delta(stats: dict, key: str) -> str:
        p = stats["paired"][key]
        return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]"

    lines = [f"Machine: {report['machine']}; command: `{report['command']}`; seeds {report['seeds']}; every variant "
             f"fine-tuned from the pretrained base `{report['base']}` ({report['epochs']} stage-one epochs, "
             f"{report['combiner_epochs']} stage-two epochs, {report['steps']['stage_one']} and "
             f"{report['steps']['stage_two']} optimizer steps for every variant); held-out catalog: synthetic "
             f"`{report['test_size']}` generated with seed {report['test_seed']} ({report['queries']:,} queries of "
             f"its val split), best epoch chosen on the training catalog's val split. Δ: the mean paired "
             f"difference to clip4cir of the same seed, with its 95% interval (t, {len(report['seeds']) - 1} degrees "
             f"of freedom) over both standard errors: the seeds' and the held-out query sample's (a bootstrap over "
             f"queries).", ""]
    for title, rows in (("Stage one (Sum), fine-tuned from the pretrained base", report["stage_one"]),
                        ("Stage two (Combiner) on the clip4cir stage-one encoder", report["stage_two"]),
                        ("Whole pipelines (Combiner)", report["pipelines"])):
        lines += [f"### {title}", "",
                  "| variant | avg R@10 | Δ avg R@10 [95% CI] | SE seeds / queries | avg R@50 | Δ avg R@50 [95% CI] | "
                  + " | ".join(f"{c} R@10" for c in categories) + " | s / epoch | × time |",
                  "|---" * (8 + len(categories)) + "|"]
        for name, stats in rows.items():
            first = name == next(iter(rows))
            lines.append(f"| {name} | {cell(stats, 'average/R@10')} | "
                         + ("—" if first else delta(stats, "average/R@10")) + " | "
                         + ("—" if first else f"{stats['paired']['average/R@10']['seed_se']:.2f} / "
                                              f"{stats['paired']['average/R@10']['query_se']:.2f}") + " | "
                         + f"{cell(stats, 'average/R@50')} | " + ("—" if first else delta(stats, "average/R@50"))
                         + " | " + " | ".join(cell(stats, f"{c}/R@10") for c in categories)
                         + f" | {stats['seconds_per_epoch']['mean']:.2f} | {stats['paired']['time_ratio']:.2f} |")
        lines.append("")
    winners = report["beats_clip4cir"]
    lines.append("Variants whose paired interval of avg R@10 lies above zero (each interval on its own, not "
                 "corrected for the number of variants compared): "
                 + (", ".join(f"{stage}: {name}" for stage, name in winners) if winners else "none") + ".")
    return "\n".join(lines) + "\n"


def run_ablation(config: str, out: Path, work: str | None = None, workers: int = 2) -> dict:
    """Run the ablation of ``CONFIGS[config]``; writes ablation.json and ablation.md into ``out``."""
    cfg = CONFIGS[config]
    started = time.perf_counter()
    stage_one = {name: [] for name, _ in variants(1)}
    stage_two = {name: [] for name, _ in variants(2)}
    pipelines = {"clip4cir → clip4cir": [], "plus → plus": []}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        work_dir = Path(tmp)
        data, test_data, cache = work_dir / "train-catalog", work_dir / "held-out-catalog", work_dir / "cache"
        make_synthetic_fashioniq(data, cfg["size"], seed=0)
        make_synthetic_fashioniq(test_data, cfg["test_size"], seed=1)
        for seed in cfg["seeds"]:
            encoders = {}
            for name, extra in variants(1):
                run = work_dir / f"s1-{seed}-{len(encoders)}"
                print(f"ablation: seed {seed}, stage one, {name}", flush=True)
                encoders[name] = run_stage_one(data, run, seed, extra, cfg, workers)
                stage_one[name].append({**held_out(encoders[name], None, test_data, cache), **run_facts(run)})
            check_equal_steps(stage_one, seed, "stage one")
            for i, (name, extra) in enumerate(variants(2)):
                run = work_dir / f"s2-{seed}-{i}"
                print(f"ablation: seed {seed}, stage two, {name}", flush=True)
                combiner = run_stage_two(data, encoders[BASELINE], run, seed, extra, cfg, workers,
                                         cache)
                result = {**held_out(encoders[BASELINE], combiner, test_data, cache), **run_facts(run)}
                stage_two[name].append(result)
                if name == BASELINE:
                    pipelines["clip4cir → clip4cir"].append(result)
            run = work_dir / f"s2-{seed}-pipeline"
            combiner = run_stage_two(data, encoders["plus"], run, seed, components("plus"), cfg, workers,
                                     cache)
            pipelines["plus → plus"].append({**held_out(encoders["plus"], combiner, test_data, cache),
                                             **run_facts(run)})
            check_equal_steps({**stage_two, **pipelines}, seed, "stage two")
    m = machine()
    tables = {stage: {k: summary(v, rows[next(iter(rows))]) for k, v in rows.items()}
              for stage, rows in (("stage_one", stage_one), ("stage_two", stage_two), ("pipelines", pipelines))}
    report = {"config": config, "command": f"python scripts/benchmark.py ablation --config {config}",
              "machine": f"{m['cpu']}, {m['cores']} cores", "seeds": cfg["seeds"], "size": cfg["size"],
              "test_size": cfg["test_size"], "test_seed": 1, "base": str(BASE.relative_to(DEMO_DIR.parent)),
              "epochs": cfg["epochs"], "combiner_epochs": cfg["combiner_epochs"],
              "queries": sum(len(r) for r in stage_one[BASELINE][0]["ranks"].values()),
              "steps": {"stage_one": stage_one[BASELINE][0]["steps"], "stage_two": stage_two[BASELINE][0]["steps"]},
              "recipes": {name: asdict(recipe) for name, recipe in RECIPES.items()},
              "seconds": round(time.perf_counter() - started, 1), **tables,
              "beats_clip4cir": [(stage, name) for stage, rows in tables.items() for name, stats in rows.items()
                                 if name not in (BASELINE, "clip4cir → clip4cir") and beats_baseline(stats)]}
    write_report(out, stem_for("ablation", config, "full"), report, markdown)
    return report
