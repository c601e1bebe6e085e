"""The labels benchmark (``python scripts/benchmark.py labels``): each metric-learning loss against the zero-shot
encoder on a synthetic identity set, judged on identities never seen in training or in choosing settings.

The learning rate of each loss is chosen on the validation identities (seed 0, the best epoch by validation
MAP@R); every loss is then trained at its chosen rate with several seeds, and MAP@R, R@1 and attribute agreement
on the test identities are reported as mean ± std over seeds, beside the zero-shot encoder of the same seed and
the training throughput. Writes ``labels.json`` and ``labels.md``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.data.sources import SourceOptions, open_source
from clip4cir.data.synthetic import make_synthetic_identities
from clip4cir.evaluation.tasks import EvalRequest, labels_task
from clip4cir.models.encoder_file import load_encoder
from clip4cir.training.checkpointing import read_metrics
from clip4cir.training.labels import LabelConfig, LabelTask
from clip4cir.training.metric_losses import LOSSES
from clip4cir.training.trainer import train_here

CONFIGS = {
    "smoke": {"identities": 24, "views": 4, "seeds": [0], "epochs": 1, "lrs": ["1e-3"], "batch": 16,
              "losses": ["triplet-random", "supcon"]},
    "full": {"identities": 240, "views": 6, "seeds": [0, 1, 2], "epochs": 8, "lrs": ["1e-3", "3e-4"], "batch": 32,
             "losses": list(LOSSES)},
}
REPORTED = ("MAP@R", "R@1", "R-precision", "attributes@10")


def train(data: Path, run: Path, loss: str, lr: str, seed: int, cfg: dict) -> dict:
    """Train one loss; the best epoch's validation MAP@R and the median throughput (images/s)."""
    train_here(LabelTask, LabelConfig(source=SourceOptions(str(data / "labels.csv"), "labels"), output=str(run),
                                      epochs=cfg["epochs"], batch_size=cfg["batch"], lr=float(lr), save_best=True,
                                      quiet=True, seed=seed, device="cpu", model="cir-tiny", loss=loss))
    log = read_metrics(run / "metrics.jsonl")
    return {"val_map_at_r": max(r["score"] for r in log),
            "images_per_s": statistics.median(r["samples_per_s"] for r in log)}


def test_metrics(data: Path, run: Path) -> dict:
    """The zero-shot and fine-tuned encoders on the test identities."""
    return labels_task(load_encoder(run / "best.safetensors"), open_source(data / "labels.csv"),
                       EvalRequest("test", progress=False)).metrics


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def markdown(report: dict) -> str:
    def cell(s: dict) -> str:
        return f"{s['mean']:.1f} ± {s['std']:.1f}"

    lines = [f"Machine: {report['machine']}; command: `{report['command']}`; cir-tiny from random init; "
             f"{report['identities']} synthetic identities × {report['views']} views, split by identity; "
             f"{report['epochs']} epochs, batch {report['batch']}; learning rate chosen on the validation "
             f"identities, numbers on the {report['test_identities']} test identities; seeds {report['seeds']}.",
             "", "| encoder | lr (chosen on val) | " + " | ".join(REPORTED) + " | images/s |",
             "|---" * (3 + len(REPORTED)) + "|",
             "| zero-shot | - | " + " | ".join(cell(report["zero_shot"][m]) for m in REPORTED) + " | - |"]
    for loss, row in report["losses"].items():
        lines.append(f"| {loss} | {row['lr']} | " + " | ".join(cell(row[m]) for m in REPORTED)
                     + f" | {row['images_per_s']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def run_labels(config: str, out: Path, work: str | None = None) -> dict:
    """Run the benchmark of ``CONFIGS[config]``; writes labels.json and labels.md into ``out``."""
    cfg = CONFIGS[config]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        work_dir = Path(tmp)
        data = work_dir / "identities"
        make_synthetic_identities(data, cfg["identities"], cfg["views"], seed=0)
        chosen = {}
        for loss in cfg["losses"]:
            val = {lr: train(data, work_dir / f"{loss}-{lr}-0", loss, lr, 0, cfg) for lr in cfg["lrs"]}
            chosen[loss] = max(cfg["lrs"], key=lambda lr: val[lr]["val_map_at_r"])
            print(f"labels: {loss}: validation MAP@R by lr {val}; chosen {chosen[loss]}", flush=True)
        runs = {loss: [] for loss in cfg["losses"]}
        zero_shot = []
        for seed in cfg["seeds"]:
            for loss in cfg["losses"]:
                run = work_dir / f"{loss}-{chosen[loss]}-{seed}"
                trained = train(data, run, loss, chosen[loss], seed, cfg) if not run.exists() else \
                    {"images_per_s": statistics.median(r["samples_per_s"] for r in read_metrics(
                        run / "metrics.jsonl"))}
                result = test_metrics(data, run)
                runs[loss].append({**result["fine-tuned"], "images_per_s": trained["images_per_s"]})
                if loss == cfg["losses"][0]:
                    zero_shot.append(result["zero-shot"])
        test_identities = result["fine-tuned"]["labels"]
    report = {"config": config, "command": f"python scripts/benchmark.py labels --config {config}",
              "machine": "{cpu}, {cores} cores".format(**machine()), **{k: cfg[k] for k in (
                  "identities", "views", "seeds", "epochs", "batch")}, "test_identities": test_identities,
              "seconds": round(time.perf_counter() - started, 1),
              "zero_shot": {m: spread([z[m] for z in zero_shot]) for m in REPORTED},
              "losses": {loss: {"lr": chosen[loss], **{m: spread([r[m] for r in rs]) for m in
                                                       REPORTED + ("images_per_s",)}} for loss, rs in runs.items()}}
    write_report(out, stem_for("labels", config, "full"), report, markdown)
    return report
