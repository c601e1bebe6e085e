"""Benchmarks (``scripts/benchmark.py``): feature extraction, both training stages, evaluation ranking, query
latency (Python and HTTP API), with peak memory per step; writes JSON and a markdown table (index kinds at scale:
``clip4cir.index_benchmark``).

Timings are medians of repeated runs after a warm-up. ``--config smoke`` is the smallest (the test suite runs
it), ``quick`` takes a few minutes, ``full`` is the README's table.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .artifacts import atomic_write_text
from .cli import run
from .data import GalleryDataset, TripletDataset
from .evaluation import target_ranks
from .factory import create_model
from .features import extract_image_features, loader_options
from .fusion import Combiner
from .index import CatalogIndex, Item
from .machine import machine
from .search import SearchEngine
from .sources import open_source
from .sources.fashioniq import CATEGORIES, load_image_split, load_triplets
from .synthetic import make_synthetic_fashioniq
from .train import TowerFeatures, set_train_mode, set_trainable, training_step

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
                    workers: int) -> dict:
    encoder = create_model(model, device=device)
    dataset = TripletDataset(open_source(root), "train", transform=encoder.transform, randomize_captions=True)
    optimizer = torch.optim.AdamW(set_trainable(encoder.model, towers), lr=1e-6, eps=1e-7)
    set_train_mode(encoder.model, towers)
    features = TowerFeatures(encoder, towers)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, **loader_options(workers, device))
    batches, waited, computed = iter(loader), 0.0, 0.0
    for step in range(steps + 1):  # the first step is the warm-up
        t0 = time.perf_counter()
        item = next(batches, None)
        if item is None:
            batches = iter(loader)
            item = next(batches)
        t1 = time.perf_counter()
        loss = training_step(features, encoder, item, [dataset.caption(i) for i in item["index"].tolist()], None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        t2 = time.perf_counter()
        if step:
            waited, computed = waited + t1 - t0, computed + t2 - t1
    return {"model": model, "encoder": towers, "batch": batch,
            "triplets_per_s": round(steps * batch / (waited + computed), 1),
            "data_wait_share": round(waited / (waited + computed), 3)}


def bench_evaluation(annotations: Path, repeats: int) -> dict:
    """Ranking FashionIQ-sized inputs (real annotation files, random 1024-d features), all three categories."""
    rng = np.random.default_rng(0)

    def features(n: int) -> torch.Tensor:
        return F.normalize(torch.from_numpy(rng.standard_normal((n, 1024), dtype=np.float32)), dim=-1)

    inputs = []
    for category in CATEGORIES:
        gallery = load_image_split(annotations, category, "val")
        index = {g: i for i, g in enumerate(gallery)}
        triplets = load_triplets(annotations, category, "val")
        inputs.append((features(len(gallery)), features(len(triplets)),
                       torch.tensor([index[t.target] for t in triplets])))
    times = timed(lambda: [target_ranks(q, g, t) for g, q, t in inputs], repeats)
    return {"galleries": [len(g) for g, _, _ in inputs], "queries": [len(q) for _, q, _ in inputs],
            "dim": 1024, "seconds": round(statistics.median(times), 3)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_latency(model: str, root: Path, gallery_size: int, repeats: int, http: bool) -> dict:
    encoder = create_model(model)
    images = GalleryDataset(open_source(root), "val")
    paths = [str(images.path(i)) for i in range(len(images))]
    rng = np.random.default_rng(0)
    index = CatalogIndex(encoder.dim, encoder=encoder.record())
    index.add([Item(f"item{i}", paths[i % len(paths)], (CATEGORIES[i % 3],)) for i in range(gallery_size)],
              rng.standard_normal((gallery_size, encoder.dim), dtype=np.float32))
    index.source["folders"] = sorted({os.path.dirname(path) for path in paths})
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
        out["python"][name] = percentiles_ms(timed(lambda: query(next(counter) % repeats), repeats))
    encoder.trim_context = False  # before: the full 77-token context
    counter = iter(range(10 ** 9))
    out["python"]["composed_gallery_ref_full_context"] = percentiles_ms(
        timed(lambda: queries["composed_gallery_ref"](next(counter) % repeats), repeats))
    encoder.trim_context = True
    if http:
        out["http"] = _bench_http(engine, root / "app-cache", ids, paths, captions, repeats)
    return out


def _bench_http(engine: SearchEngine, cache: Path, ids, paths, captions, repeats: int) -> dict:
    """The same queries through the app's named API, as a ``gradio_client`` user calls it (results come back as
    records with thumbnail links; no image is downloaded)."""
    from gradio_client import Client, handle_file

    from .ui import serve
    port = _free_port()
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
            out[name] = percentiles_ms(timed(lambda: call(next(counter) % repeats), repeats))
        return out
    finally:
        ui.close()


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


def main(argv: Sequence[str] | None = None,
         stage_two: Callable[[str, Path, int, int, Path], dict] | None = None) -> int:
    """The benchmark command; ``stage_two`` measures stage two (``combiner.benchmark.bench_stage_two``, passed in
    by ``scripts/benchmark.py``: the library does not depend on the ``combiner`` package)."""
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__)
    parser.add_argument("--config", choices=list(CONFIGS), default="full")
    parser.add_argument("--quick", action="store_const", const="quick", dest="config", help="--config quick")
    parser.add_argument("--out", default="benchmark", help="folder for report.json and report.md")
    parser.add_argument("--annotations", default=str(Path(__file__).resolve().parents[2] / "shared" / "fashioniq"),
                        help="the real FashionIQ annotation files (for the evaluation step)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP-API latencies")
    parser.add_argument("--steps", default="extraction,stage_one,stage_two,evaluation,latency")
    args = parser.parse_args(argv)
    cfg, steps = CONFIGS[args.config], set(args.steps.split(","))
    if "stage_two" in steps and stage_two is None:
        raise ValueError("the stage_two step needs the stage-two benchmark: run scripts/benchmark.py")
    if "evaluation" in steps and not (Path(args.annotations) / "captions").is_dir():
        raise FileNotFoundError(f"--annotations {args.annotations} holds no FashionIQ captions/ folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
                    step("extraction",
                         lambda: bench_extraction(model, root, cfg["extract_images"], device, args.workers))
        if "stage_one" in steps:
            for model in cfg["models"]:
                for towers in cfg["encoders"]:
                    step("stage_one", lambda: bench_stage_one(model, root, towers, cfg["train_steps"],
                                                              cfg["train_batch"], devices[-1], args.workers))
        if "stage_two" in steps:
            for model, catalog, batch in cfg["stage_two"]:
                catalog_root = root if catalog == cfg["catalog"] else tmp / f"catalog-{catalog}"
                if not catalog_root.exists():
                    make_synthetic_fashioniq(catalog_root, catalog, seed=0)
                step("stage_two", lambda: stage_two(model, catalog_root, batch, args.workers, tmp))
        if "evaluation" in steps:
            step("evaluation", lambda: bench_evaluation(Path(args.annotations), 3))
            results["evaluation"] = results["evaluation"][0]
        if "latency" in steps:
            for model in cfg["models"]:
                step("latency", lambda: bench_latency(model, root, cfg["gallery"], cfg["repeats"], not args.no_http))
    report = {"config": args.config, "machine": machine(), "seconds": round(time.perf_counter() - started, 1),
              "results": results}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'report.json'} and {out / 'report.md'} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
