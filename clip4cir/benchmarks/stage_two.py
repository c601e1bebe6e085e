"""The stage-two step of the pipeline benchmark: seconds per Combiner epoch on cached features vs re-encoding
every batch (same data, batch and loss)."""
from __future__ import annotations

import time
from pathlib import Path

from clip4cir.data.datasets import TripletDataset
from clip4cir.data.sources import SourceOptions, open_source
from clip4cir.models.factory import create_model
from clip4cir.training.checkpointing import read_metrics
from clip4cir.training.trainer import train_here
from combiner.feature_cache import triplet_features
from combiner.stage_two import StageTwoConfig, StageTwoTask


def bench_stage_two(model: str, root: Path, batch: int, workers: int, tmp: Path) -> dict:
    """Seconds per Combiner epoch on cached features vs re-encoding every batch (same data, batch, loss)."""
    encoder = create_model(model)  # seeded: the training runs below build the same weights
    start = time.perf_counter()
    train_set = TripletDataset(open_source(root), "train", transform=encoder.transform)
    triplet_features(encoder, train_set, tmp / "cache", workers=workers, progress=False)
    out = {"model": model, "triplets": len(train_set), "batch": batch,
           "cache_build_s": round(time.perf_counter() - start, 2)}
    for name, reencode in (("cached", False), ("reencode", True)):
        run_dir = tmp / f"stage2-{model}-{name}"
        config = StageTwoConfig(source=SourceOptions(str(root)), output=str(run_dir), model=model,
                                epochs=2 if model == "cir-tiny" else 1,  # an RN50 re-encoding epoch takes minutes
                                batch_size=batch, lr=1e-3, workers=workers, cache_dir=str(tmp / "cache"), quiet=True,
                                device="cpu", reencode=reencode)
        train_here(StageTwoTask, config)
        log = read_metrics(run_dir / "metrics.jsonl")
        out[f"{name}_epoch_s"] = round(log[-1]["seconds"], 4)  # the last epoch: warm where there are two
        out[f"{name}_val_R@10"] = round(log[-1]["average"]["R@10"], 2)
    out["speedup"] = round(out["reencode_epoch_s"] / out["cached_epoch_s"], 1)
    return out
