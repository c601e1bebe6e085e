"""The recipe ablation (``python scripts/ablation.py``): every variant trained from the same initial weights, with the
same seed, epochs, batch and data, over several seeds; settings chosen on a validation split, the numbers
reported on a held-out catalog generated with another seed (never seen while choosing).

Stage one: CLIP4Cir's recipe, each component of ``plus`` alone, and ``plus``; each evaluated with the Sum.
Stage two: on the ``clip4cir`` stage-one encoder of the same seed, CLIP4Cir's Combiner recipe, each stage-two
component alone, and ``plus``; and the whole pipelines (clip4cir then clip4cir, plus then plus). Writes
``ablation.json`` and ``ablation.md`` (mean ± std over seeds of avg and per-category R@10/R@50, seconds per
epoch).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.data.sources import SourceOptions, open_source
from clip4cir.data.synthetic import make_synthetic_fashioniq
from clip4cir.evaluation.composed import evaluate
from clip4cir.models.combiner import combine_sum, load_combiner
from clip4cir.models.encoder_file import load_encoder
from clip4cir.training.checkpointing import read_metrics
from clip4cir.training.recipes import RECIPES, STAGE_TWO_ONLY
from clip4cir.training.stage_one import StageOneConfig, StageOneTask
from clip4cir.training.trainer import train_here
from combiner.stage_two import StageTwoConfig, StageTwoTask

CONFIGS = {
    "smoke": {"size": "tiny", "seeds": [0], "epochs": 1, "combiner_epochs": 2, "batch": 8, "combiner_batch": 16},
    "full": {"size": "demo", "seeds": [0, 1, 2], "epochs": 12, "combiner_epochs": 60, "batch": 64,
             "combiner_batch": 256},
}
STAGE_ONE_LR, STAGE_TWO_LR = 5e-4, 1e-3  # the demo model's rates: cir-tiny from random init, on the CPU


def components(recipe: str, only: str | None = None) -> dict:
    """The settings of a variant: a recipe, or the clip4cir recipe with one of plus's components switched on."""
    if only is None:
        return {"recipe": recipe}
    return {"recipe": "clip4cir", only: asdict(RECIPES["plus"])[only]}


def variants(stage: int) -> list[tuple[str, dict]]:
    """(name, settings) of the variants of a stage: each plus component that differs from clip4cir, alone."""
    plus, paper = asdict(RECIPES["plus"]), asdict(RECIPES["clip4cir"])
    changed = [c for c, v in plus.items() if v != paper[c] and (stage == 2 or c not in STAGE_TWO_ONLY)]
    return [("clip4cir", components("clip4cir"))] + \
        [(f"+ {c.replace('_', ' ')}", components("clip4cir", c)) for c in changed] + [("plus", components("plus"))]


def epoch_seconds(run: Path) -> float:
    return statistics.median(r["seconds"] for r in read_metrics(run / "metrics.jsonl"))


def run_stage_one(data: Path, out: Path, seed: int, settings: dict, cfg: dict, workers: int) -> Path:
    config = StageOneConfig(source=SourceOptions(str(data)), output=str(out), model="cir-tiny", seed=seed,
                            epochs=cfg["epochs"], batch_size=cfg["batch"], lr=STAGE_ONE_LR, workers=workers,
                            quiet=True, save_best=True, device="cpu", **settings)
    train_here(StageOneTask, config)
    return out / "best.safetensors"


def run_stage_two(data: Path, encoder: Path, out: Path, seed: int, settings: dict, cfg: dict, workers: int,
                  cache: Path) -> Path:
    config = StageTwoConfig(source=SourceOptions(str(data)), output=str(out), clip_checkpoint=str(encoder),
                            seed=seed, epochs=cfg["combiner_epochs"], batch_size=cfg["combiner_batch"],
                            lr=STAGE_TWO_LR, workers=workers, quiet=True, save_best=True, val_every=5,
                            cache_dir=str(cache), device="cpu", **settings)
    train_here(StageTwoTask, config)
    return out / "best.safetensors"


def held_out(encoder_path: Path, combiner_path: Path | None, test_data: Path) -> dict:
    """The metrics of a chosen model on the held-out catalog (its val split: items never seen)."""
    encoder = load_encoder(encoder_path)
    combine = load_combiner(combiner_path, encoder=encoder)[0].combine if combiner_path else combine_sum
    return evaluate(encoder, open_source(test_data), combine=combine, progress=False)


def summary(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every metric, and of the seconds per epoch."""
    keys = [(group, metric) for group, values in runs[0]["metrics"].items() if isinstance(values, dict)
            for metric in values]
    out = {f"{g}/{m}": [r["metrics"][g][m] for r in runs] for g, m in keys}
    out["seconds_per_epoch"] = [r["seconds_per_epoch"] for r in runs]
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
            for k, v in out.items()}


def markdown(report: dict) -> str:
    categories = ("dress", "shirt", "toptee")

    def cell(stats: dict, key: str) -> str:
        s = stats[key]
        return f"{s['mean']:.2f} ± {s['std']:.2f}"

    lines = [f"Machine: {report['machine']}; command: `{report['command']}`; seeds {report['seeds']}; "
             f"held-out catalog: synthetic `{report['size']}` generated with seed {report['test_seed']} (its val "
             f"split), best epoch chosen on the training catalog's val split.", ""]
    for title, rows in (("Stage one (Sum), cir-tiny from random init", report["stage_one"]),
                        ("Stage two (Combiner) on the clip4cir stage-one encoder", report["stage_two"]),
                        ("Whole pipelines (Combiner)", report["pipelines"])):
        lines += [f"### {title}", "",
                  "| variant | avg R@10 | avg R@50 | " + " | ".join(f"{c} R@10" for c in categories) +
                  " | s / epoch |", "|---" * (4 + len(categories)) + "|"]
        for name, stats in rows.items():
            lines.append(f"| {name} | {cell(stats, 'average/R@10')} | {cell(stats, 'average/R@50')} | "
                         + " | ".join(cell(stats, f"{c}/R@10") for c in categories)
                         + f" | {stats['seconds_per_epoch']['mean']:.2f} |")
        lines.append("")
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
        data, test_data = work_dir / "train-catalog", work_dir / "held-out-catalog"
        make_synthetic_fashioniq(data, cfg["size"], seed=0)
        make_synthetic_fashioniq(test_data, cfg["size"], seed=1)
        for seed in cfg["seeds"]:
            encoders = {}
            for name, extra in variants(1):
                run = work_dir / f"s1-{seed}-{len(encoders)}"
                print(f"ablation: seed {seed}, stage one, {name}", flush=True)
                encoders[name] = run_stage_one(data, run, seed, extra, cfg, workers)
                stage_one[name].append({"metrics": held_out(encoders[name], None, test_data),
                                        "seconds_per_epoch": epoch_seconds(run)})
            for i, (name, extra) in enumerate(variants(2)):
                run = work_dir / f"s2-{seed}-{i}"
                print(f"ablation: seed {seed}, stage two, {name}", flush=True)
                combiner = run_stage_two(data, encoders["clip4cir"], run, seed, extra, cfg, workers,
                                         work_dir / "cache")
                result = {"metrics": held_out(encoders["clip4cir"], combiner, test_data),
                          "seconds_per_epoch": epoch_seconds(run)}
                stage_two[name].append(result)
                if name == "clip4cir":
                    pipelines["clip4cir → clip4cir"].append(result)
            run = work_dir / f"s2-{seed}-pipeline"
            combiner = run_stage_two(data, encoders["plus"], run, seed, components("plus"), cfg, workers,
                                     work_dir / "cache")
            pipelines["plus → plus"].append({"metrics": held_out(encoders["plus"], combiner, test_data),
                                             "seconds_per_epoch": epoch_seconds(run)})
    m = machine()
    report = {"config": config, "command": f"python scripts/ablation.py --config {config}",
              "machine": f"{m['cpu']}, {m['cores']} cores", "seeds": cfg["seeds"], "size": cfg["size"],
              "test_seed": 1, "epochs": cfg["epochs"], "combiner_epochs": cfg["combiner_epochs"],
              "recipes": {name: asdict(recipe) for name, recipe in RECIPES.items()},
              "seconds": round(time.perf_counter() - started, 1),
              "stage_one": {k: summary(v) for k, v in stage_one.items()},
              "stage_two": {k: summary(v) for k, v in stage_two.items()},
              "pipelines": {k: summary(v) for k, v in pipelines.items()}}
    write_report(out, stem_for("ablation", config, "full"), report, markdown)
    return report
