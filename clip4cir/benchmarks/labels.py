"""The labels benchmark (``python scripts/benchmark.py labels``): each metric-learning loss against the zero-shot
encoder, on two synthetic identity sets (an easy one, and a hard one with stronger pose and light changes, clutter
and occlusion), judged on identities never seen in training or in choosing settings.

Each loss's rates are chosen on the validation identities of each set (seed 0, the best epoch by validation
MAP@R): the learning rate, then, for proxy losses, the proxies' rate factor at that learning rate. A run whose
embeddings collapse (clip4cir.training.collapse) stops and cannot be chosen. Every loss is then trained at its
chosen rates with several seeds, and MAP@R, R@1, R-precision and attribute agreement on the test identities are
reported as mean ± std over seeds, beside the zero-shot encoder (with the same preprocessing) and the training
throughput. The default loss is the one with the best mean test MAP@R over the sets; the rates the loss registry
keeps are the ones chosen most often. Writes ``labels.json`` and ``labels.md``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.data.sources import SourceOptions, open_source
from clip4cir.data.synthetic import make_synthetic_identities
from clip4cir.evaluation.tasks import EvalRequest, labels_task
from clip4cir.models.encoder_file import load_encoder
from clip4cir.training.checkpointing import read_metrics
from clip4cir.training.collapse import TrainingCollapsed
from clip4cir.training.labels import LabelConfig, LabelTask
from clip4cir.training.metric_losses import LOSSES
from clip4cir.training.trainer import train_here

CONFIGS = {
    "smoke": {"sets": {"easy": {"identities": 24, "views": 4, "hard": False, "epochs": 1},
                       "hard": {"identities": 16, "views": 6, "hard": True, "epochs": 1}},
              "seeds": [0], "lrs": [1e-3], "proxy_factors": [10.0], "batch": 16,
              "losses": ["triplet-random", "supcon"]},
    "full": {"sets": {"easy": {"identities": 240, "views": 6, "hard": False, "epochs": 8},
                      "hard": {"identities": 120, "views": 12, "hard": True, "epochs": 12}},
             "seeds": [0, 1, 2], "lrs": [1e-4, 3e-4, 1e-3], "proxy_factors": [1.0, 10.0, 100.0], "batch": 32,
             "losses": list(LOSSES)},
}
REPORTED = ("MAP@R", "R@1", "R-precision", "attributes@10")


def train(data: Path, run: Path, loss: str, lr: float, factor: float, seed: int, epochs: int, batch: int) -> dict:
    """Train one loss; the best epoch's validation MAP@R (None when the embeddings collapsed) and the median
    throughput (images/s)."""
    config = LabelConfig(source=SourceOptions(str(data / "labels.csv"), "labels"), output=str(run), epochs=epochs,
                         batch_size=batch, lr=lr, proxy_lr_factor=factor, save_best=True, quiet=True, seed=seed,
                         device="cpu", model="cir-tiny", loss=loss)
    try:
        train_here(LabelTask, config)
    except TrainingCollapsed:
        return {"val_map_at_r": None, "collapsed": True}
    log = read_metrics(run / "metrics.jsonl")
    return {"val_map_at_r": max(r["score"] for r in log), "collapsed": False,
            "images_per_s": statistics.median(r["samples_per_s"] for r in log)}


def test_metrics(data: Path, run: Path) -> dict:
    """The zero-shot and fine-tuned encoders on the test identities."""
    return labels_task(load_encoder(run / "best.safetensors"), open_source(data / "labels.csv"),
                       EvalRequest("test", progress=False)).metrics


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def choose_rates(data: Path, work: Path, loss: str, cfg: dict, epochs: int) -> tuple[float, float, dict]:
    """The learning rate, then (proxy losses) the proxy factor, with the best validation MAP@R; what each scored."""
    spec = LOSSES[loss]
    proxies = spec.proxy_lr_factor != 1.0
    tried = {}

    def score(lr: float, factor: float) -> float:
        key = f"lr {lr:g}, proxies ×{factor:g}" if proxies else f"lr {lr:g}"
        if key not in tried:
            tried[key] = train(data, work / f"{loss}-{lr:g}-{factor:g}-0", loss, lr, factor, 0, epochs, cfg["batch"])
        value = tried[key]["val_map_at_r"]
        return -1.0 if value is None else value

    factor = spec.proxy_lr_factor
    lr = max(cfg["lrs"], key=lambda r: score(r, factor))
    if proxies:
        factor = max(cfg["proxy_factors"], key=lambda f: score(lr, f))
    return lr, factor, {k: v["val_map_at_r"] for k, v in tried.items()}


def bench_set(name: str, spec: dict, cfg: dict, work: Path) -> dict:
    """One identity set: rates chosen on its validation identities, then every loss over the seeds on its test
    identities."""
    data, runs_dir = work / name, work / f"{name}-runs"
    make_synthetic_identities(data, spec["identities"], spec["views"], seed=0, hard=spec["hard"])
    out = {"identities": spec["identities"], "views": spec["views"], "hard": spec["hard"], "epochs": spec["epochs"],
           "losses": {}}
    zero_shot = []
    for loss in cfg["losses"]:
        lr, factor, tried = choose_rates(data, runs_dir, loss, cfg, spec["epochs"])
        print(f"labels: {name}: {loss}: validation MAP@R {tried}; chosen lr {lr:g}, proxies ×{factor:g}", flush=True)
        runs = []
        for seed in cfg["seeds"]:
            run = runs_dir / f"{loss}-{lr:g}-{factor:g}-{seed}"
            trained = train(data, run, loss, lr, factor, seed, spec["epochs"], cfg["batch"]) if not run.exists() \
                else {"images_per_s": statistics.median(r["samples_per_s"] for r in read_metrics(
                    run / "metrics.jsonl"))}
            if not (run / "best.safetensors").exists():  # collapsed before any validated epoch
                continue
            result = test_metrics(data, run)
            runs.append({**result["fine-tuned"], "images_per_s": trained.get("images_per_s", 0.0)})
            if loss == cfg["losses"][0]:
                zero_shot.append(result["zero-shot"])
            out["test_identities"] = result["fine-tuned"]["labels"]
        out["losses"][loss] = {"lr": lr, "proxy_lr_factor": factor, "validation": tried, "runs": len(runs),
                               **({m: spread([r[m] for r in runs]) for m in REPORTED + ("images_per_s",)}
                                  if runs else {})}
    out["zero_shot"] = {m: spread([z[m] for z in zero_shot]) for m in REPORTED}
    return out


def markdown(report: dict) -> str:
    def cell(s: dict) -> str:
        return f"{s['mean']:.1f} ± {s['std']:.1f}"

    lines = [f"Machine: {report['machine']}; command: `{report['command']}`; cir-tiny from random init, batch "
             f"{report['batch']}; rates chosen on the validation identities of each set, numbers on its test "
             f"identities; seeds {report['seeds']}. Default loss (best mean test MAP@R over the sets): "
             f"**{report['default_loss']}**.", ""]
    for name, s in report["sets"].items():
        lines += [f"### {name}: {s['identities']} identities × {s['views']} views"
                  f"{' (pose, light, clutter, occlusion)' if s['hard'] else ''}, {s['epochs']} epochs, "
                  f"{s.get('test_identities', '?')} test identities", "",
                  "| encoder | rates (chosen on val) | " + " | ".join(REPORTED) + " | images/s |",
                  "|---" * (3 + len(REPORTED)) + "|",
                  "| zero-shot | - | " + " | ".join(cell(s["zero_shot"][m]) for m in REPORTED) + " | - |"]
        for loss, row in s["losses"].items():
            rates = f"lr {row['lr']:g}" + (f", proxies ×{row['proxy_lr_factor']:g}"
                                           if LOSSES[loss].proxy_lr_factor != 1.0 else "")
            if not row["runs"]:
                lines.append(f"| {loss} | {rates} | collapsed in every run | | | | |")
                continue
            lines.append(f"| {loss} | {rates} | " + " | ".join(cell(row[m]) for m in REPORTED)
                         + f" | {row['images_per_s']['mean']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run_labels(config: str, out: Path, work: str | None = None) -> dict:
    """Run the benchmark of ``CONFIGS[config]``; writes labels.json and labels.md into ``out``."""
    cfg = CONFIGS[config]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        sets = {name: bench_set(name, spec, cfg, Path(tmp)) for name, spec in cfg["sets"].items()}
    scores = {loss: statistics.mean(s["losses"][loss]["MAP@R"]["mean"] if s["losses"][loss]["runs"] else 0.0
                                    for s in sets.values()) for loss in cfg["losses"]}
    report = {"config": config, "command": f"python scripts/benchmark.py labels --config {config}",
              "machine": "{cpu}, {cores} cores".format(**machine()), "seeds": cfg["seeds"], "batch": cfg["batch"],
              "seconds": round(time.perf_counter() - started, 1), "sets": sets,
              "default_loss": max(scores, key=scores.get), "mean_test_map_at_r": scores,
              "rates": {loss: Counter((s["losses"][loss]["lr"], s["losses"][loss]["proxy_lr_factor"])
                                      for s in sets.values()).most_common(1)[0][0] for loss in cfg["losses"]}}
    write_report(out, stem_for("labels", config, "full"), report, markdown)
    return report
