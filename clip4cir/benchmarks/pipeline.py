"""The pipeline benchmark (``python scripts/benchmark.py``): feature extraction, both training stages, evaluation
ranking, query latency (Python and HTTP API), with peak memory per step; writes report.json and report.md (index
kinds at scale: clip4cir.benchmarks.index).

Timings are medians of repeated runs after a warm-up. ``--config smoke`` is the smallest (the test suite runs
it), ``quick`` takes a few minutes, ``full`` is the documented table (benchmark/README.md).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.benchmarks.stage_two import bench_stage_two
from clip4cir.core.ports import free_port
from clip4cir.data.datasets import GalleryDataset
from clip4cir.data.sources import SourceOptions, open_source
from clip4cir.data.sources.fashioniq import CATEGORIES, FashionIQ
from clip4cir.data.synthetic import make_synthetic_fashioniq
from clip4cir.evaluation.ranking import target_ranks
from clip4cir.models.combiner import Combiner
from clip4cir.models.factory import create_model
from clip4cir.models.features import extract_image_features
from clip4cir.retrieval.index import CatalogIndex, Item
from clip4cir.retrieval.search import SearchEngine
from clip4cir.training.stage_one import StageOneConfig, StageOneTask
from clip4cir.training.trainer import train_here

CONFIGS = {
    "smoke": {"models": ["cir-tiny"], "catalog": "tiny", "extract_images": 32, "train_steps": 2,
              "train_batch": 8, "stage_two": [("cir-tiny", "tiny", 8)], "gallery": 2_000, "repeats": 5,
              "encoders": ["both"]},
    "quick": {"models": ["cir-tiny", "RN50"], "catalog": "tiny", "extract_images": 64, "train_steps": 3,
              "train_batch": 8, "stage_two": [("cir-tiny", "tiny", 16), ("RN50", "tiny", 16)], "gallery": 10_000,
              "repeats": 20, "encoders": ["both", "image", "text"]},
    "full": {"models": ["cir-tiny", "RN50"], "catalog": "demo", "extract_images": 256, "train_steps": 8,
             "train_batch": 16, "stage_two": [("cir-tiny", "demo", 256), ("RN50", "demo", 256)], "gallery": 10_000,
             "repeats": 50, "encoders": ["both", "image", "text"]},
}


# ---- measuring -----------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


@contextmanager
def peak_memory(record: dict):
    """Peak resident memory (MiB) of the process during the block (Linux's VmHWM, reset first)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    yield
    record["peak_rss_mib"] = round(_status_kb("VmHWM:") / 1024, 1)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def percentiles_ms(times: Sequence[float]) -> dict:
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


# ---- the steps -----------------------------------------------------------------------------------------------
def bench_extraction(model: str, root: Path, n_images: int, device: torch.device, workers: int) -> dict:
    encoder = create_model(model, device=device)
    dataset = GalleryDataset(open_source(root), "train", transform=encoder.transform)
    subset = Subset(dataset, range(min(n_images, len(dataset))))
    extract_image_features(encoder, Subset(dataset, range(32)), 32, 0, progress=False)  # warm-up
    start = time.perf_counter()
    extract_image_features(encoder, subset, 32, workers, progress=False)
    seconds = time.perf_counter() - start
    return {"model": model, "device": device.type, "images": len(subset),
            "images_per_s": round(len(subset) / seconds, 1)}


def bench_stage_one(model: str, root: Path, towers: str, steps: int, batch: int, device: torch.device,
                    workers: int, work: Path) -> dict:
    """Training throughput of stage one as the trainer runs it (data loading, forward, backward, optimizer step),
    from the trainer's own step timings; the first step is the warm-up."""
    steps_seen: list[dict] = []
    config = StageOneConfig(source=SourceOptions(str(root)), output=str(work / f"stage1-{model}-{towers}"),
                            model=model, encoder=towers, batch_size=batch, lr=1e-6, workers=workers, quiet=True,
                            epochs=10 ** 6, val_every=10 ** 6, max_steps=steps + 1, device=device.type)
    train_here(StageOneTask, config, hooks=[steps_seen.append])
    measured = steps_seen[1:]
    waited, computed = sum(s["wait"] for s in measured), sum(s["seconds"] for s in measured)
    return {"model": model, "encoder": towers, "batch": batch,
            "triplets_per_s": round(sum(s["samples"] for s in measured) / (waited + computed), 1),
            "data_wait_share": round(waited / (waited + computed), 3)}


def bench_evaluation(annotations: Path, repeats: int) -> dict:
    """Ranking FashionIQ-sized inputs (real annotation files, random 1024-d features), all three categories."""
    rng = np.random.default_rng(0)

    def features(n: int) -> torch.Tensor:
        return F.normalize(torch.from_numpy(rng.standard_normal((n, 1024), dtype=np.float32)), dim=-1)

    source = FashionIQ(annotations)
    split = source.protocol.val_split
    gallery, triplets = source.gallery(split), source.triplets(split)
    inputs = []
    for category in source.categories():
        ids = [image_id for image_id, categories in gallery.items() if category in categories]
        index = {image_id: i for i, image_id in enumerate(ids)}
        queries = [t for t in triplets if t.category == category]
        inputs.append((features(len(ids)), features(len(queries)), torch.tensor([index[t.target] for t in queries])))
    times = timed(lambda: [target_ranks(q, g, t) for g, q, t in inputs], repeats)
    return {"galleries": [len(g) for g, _, _ in inputs], "queries": [len(q) for _, q, _ in inputs],
            "dim": 1024, "seconds": round(statistics.median(times), 3)}



def bench_latency(model: str, root: Path, gallery_size: int, repeats: int, http: bool) -> dict:
    encoder = create_model(model)
    images = GalleryDataset(open_source(root), "val")
    paths = [str(images.path(i)) for i in range(len(images))]
    rng = np.random.default_rng(0)
    index = CatalogIndex(encoder.dim, encoder=encoder.record())
    index.add([Item(f"item{i}", paths[i % len(paths)], (CATEGORIES[i % 3],)) for i in range(gallery_size)],
              rng.standard_normal((gallery_size, encoder.dim), dtype=np.float32))
    torch.manual_seed(0)
    engine = SearchEngine(index, encoder, Combiner(encoder.dim))
    ids = [f"item{i}" for i in rng.integers(0, gallery_size, repeats + 1)]
    captions = ["is red with shorter sleeves", "is darker and has a collar", "is blue instead of white"]
    queries = {
        "composed_gallery_ref": lambda i: engine.composed_search(captions[i % 3], reference_id=ids[i], k=10),
        "composed_upload": lambda i: engine.composed_search(captions[i % 3], image=paths[i % len(paths)], k=10),
        "image": lambda i: engine.image_search(paths[i % len(paths)], k=10),
        "text": lambda i: engine.text_search(captions[i % 3], k=10),
    }
    out = {"model": model, "gallery": gallery_size, "python": {}}
    for name, query in queries.items():
        counter = iter(range(10 ** 9))
        out["python"][name] = {**percentiles_ms(timed(partial(_next_query, query, counter, repeats), repeats)),
                               "results": len(query(0).hits)}  # what one call returned: it was answered
    encoder.trim_context = False  # before: the full 77-token context
    counter = iter(range(10 ** 9))
    out["python"]["composed_gallery_ref_full_context"] = {
        **percentiles_ms(timed(partial(_next_query, queries["composed_gallery_ref"], counter, repeats), repeats)),
        "results": len(queries["composed_gallery_ref"](0).hits)}
    encoder.trim_context = True
    if http:
        out["http"] = _bench_http(engine, root / "app-cache", ids, paths, captions, repeats)
    return out


def _bench_http(engine: SearchEngine, cache: Path, ids, paths, captions, repeats: int) -> dict:
    """The same queries through the app's named API, as a ``gradio_client`` user calls it (results come back as
    records with thumbnail links; no image is downloaded)."""
    from gradio_client import Client, handle_file

    from clip4cir.serving.ui import serve
    port = free_port()
    ui = serve(engine, cache, port=port, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        calls = {
            "composed_gallery_ref": lambda i: client.predict(caption=captions[i % 3], reference_id=ids[i], k=10,
                                                             api_name="/composed_search"),
            "composed_upload": lambda i: client.predict(caption=captions[i % 3], image=handle_file(paths[i % len(
                paths)]), k=10, api_name="/composed_search"),
            "image": lambda i: client.predict(image=handle_file(paths[i % len(paths)]), k=10,
                                              api_name="/image_search"),
            "text": lambda i: client.predict(caption=captions[i % 3], k=10, api_name="/text_search"),
        }
        out = {}
        for name, call in calls.items():
            counter = iter(range(10 ** 9))
            out[name] = {**percentiles_ms(timed(partial(_next_query, call, counter, repeats), repeats)),
                         "results": len(call(0)["results"])}
        return out
    finally:
        ui.close()


def _next_query(query: Callable, counter: Iterator[int], repeats: int):
    """One timed call: the next of ``repeats`` different queries, so no answer is a cached repeat."""
    return query(next(counter) % repeats)


# ---- report --------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    r, m = report["results"], report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; torch {m['versions']['torch']}, "
             f"faiss {m['versions']['faiss']}; config `{report['config']}`.", "",
             "| step | setting | result | peak RSS MiB |", "|---|---|---|---|"]
    for e in r.get("extraction", []):
        lines.append(f"| feature extraction | {e['model']} ({e['device']}) | {e['images_per_s']} images/s | "
                     f"{e['peak_rss_mib']} |")
    for s in r.get("stage_one", []):
        lines.append(f"| stage one | {s['model']}, encoder {s['encoder']}, batch {s['batch']} | "
                     f"{s['triplets_per_s']} triplets/s, data wait {100 * s['data_wait_share']:.0f}% | "
                     f"{s['peak_rss_mib']} |")
    for s in r.get("stage_two", []):
        lines.append(f"| stage two epoch | {s['model']}, {s['triplets']:,} triplets, batch {s['batch']} | "
                     f"cached {s['cached_epoch_s']} s vs "
                     f"re-encoding {s['reencode_epoch_s']} s: **{s['speedup']}×** (val R@10 {s['cached_val_R@10']} vs "
                     f"{s['reencode_val_R@10']}; cache built in {s['cache_build_s']} s) | {s['peak_rss_mib']} |")
    if "evaluation" in r:
        e = r["evaluation"]
        lines.append(f"| evaluation ranking | FashionIQ val sizes, 1024-d, 3 categories | {e['seconds']} s | "
                     f"{e['peak_rss_mib']} |")
    for q in r.get("latency", []):
        for api in ("python", "http"):
            for name, p in q.get(api, {}).items():
                lines.append(f"| query latency ({api}) | {q['model']}, {q['gallery']:,} items, {name} | "
                             f"p50 {p['p50_ms']} ms, p95 {p['p95_ms']} ms | {q['peak_rss_mib']} |")
    return "\n".join(lines) + "\n"


STEPS = ("extraction", "stage_one", "stage_two", "evaluation", "latency")


def run_pipeline(config: str, out: Path, annotations: Path, workers: int = 2, http: bool = True,
                 steps: Sequence[str] = STEPS) -> dict:
    """Run the benchmark of ``CONFIGS[config]`` (the ``steps`` of it); writes report.json and report.md."""
    cfg, steps = CONFIGS[config], set(steps)
    if "evaluation" in steps and not (annotations / "captions").is_dir():
        raise FileNotFoundError(f"--annotations {annotations} holds no FashionIQ captions/ folder")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results: dict = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "catalog"
        make_synthetic_fashioniq(root, cfg["catalog"], seed=0)

        def step(name: str, fn: Callable[[], dict | list]) -> None:
            record: dict = {}
            print(f"benchmark: {name} ...", flush=True)
            with peak_memory(record):
                value = fn()
            for row in value if isinstance(value, list) else [value]:
                row.setdefault("peak_rss_mib", record["peak_rss_mib"])
            results.setdefault(name, []).extend(value if isinstance(value, list) else [value])

        if "extraction" in steps:
            for model in cfg["models"]:
                for device in devices:
                    step("extraction", partial(bench_extraction, model, root, cfg["extract_images"], device, workers))
        if "stage_one" in steps:
            for model in cfg["models"]:
                for towers in cfg["encoders"]:
                    step("stage_one", partial(bench_stage_one, model, root, towers, cfg["train_steps"],
                                                      cfg["train_batch"], devices[-1], workers, tmp))
        if "stage_two" in steps:
            for model, catalog, batch in cfg["stage_two"]:
                catalog_root = root if catalog == cfg["catalog"] else tmp / f"catalog-{catalog}"
                if not catalog_root.exists():
                    make_synthetic_fashioniq(catalog_root, catalog, seed=0)
                step("stage_two", partial(bench_stage_two, model, catalog_root, batch, workers, tmp))
        if "evaluation" in steps:
            step("evaluation", lambda: bench_evaluation(annotations, 3))
            results["evaluation"] = results["evaluation"][0]
        if "latency" in steps:
            for model in cfg["models"]:
                step("latency", partial(bench_latency, model, root, cfg["gallery"], cfg["repeats"], http))
    report = {"config": config, "machine": machine(), "seconds": round(time.perf_counter() - started, 1),
              "results": results}
    write_report(out, stem_for("report", config, "full"), report, markdown)
    return report
