"""The serving benchmark (``python scripts/benchmark.py serving``): what a client waits for, with each runtime
(torch, ONNX Runtime fp32 and int8), through the engine, the JSON endpoint and ``gradio_client``, for one client
and for 8 and 16 concurrent ones: p50 / p99 latency and throughput, side by side in one run, on one machine.

The catalog is the synthetic one's images under random features (the index's speed is the index benchmark's
business); the queries are composed ones with a catalog reference and with an uploaded photo, and text ones, the
kinds a shop's clients send. Every query's answer is checked to hold its k results.
"""
from __future__ import annotations

import base64
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.core.ports import free_port
from clip4cir.data.datasets import GalleryDataset
from clip4cir.data.sources import open_source
from clip4cir.data.synthetic import make_synthetic_fashioniq
from clip4cir.models.combiner import Combiner
from clip4cir.models.factory import create_model
from clip4cir.models.runtime import load_towers
from clip4cir.retrieval.index import CatalogIndex, Item
from clip4cir.retrieval.search import SearchEngine
from clip4cir.retrieval.threads import configure_serving_threads
from clip4cir.serving.batching import BatchedTowers

CONFIGS = {
    "smoke": {"model": "cir-tiny", "gallery": 2_000, "requests": 12, "clients": [1, 4], "runtimes": ["torch", "onnx"],
              "apis": ["engine", "json"]},
    "full": {"model": "RN50", "gallery": 10_000, "requests": 160, "clients": [1, 8, 16],
             "runtimes": ["torch", "onnx", "onnx-int8"], "apis": ["engine", "json", "gradio"]},
}
QUERIES = ("composed_reference", "composed_upload", "text")
CAPTIONS = ("is red with shorter sleeves", "is darker and has a collar", "is blue instead of white")
K = 10



def catalog_engine(model: str, root: Path, size: int) -> tuple[SearchEngine, list[str], list[str]]:
    """An engine over ``size`` items (the catalog's images, random features): its ids and some photo files."""
    encoder = create_model(model)
    paths = [GalleryDataset(open_source(root), "val").path(i) for i in range(64)]
    index = CatalogIndex(encoder.dim, encoder=encoder.record())
    rng = np.random.default_rng(0)
    index.add([Item(f"item{i}", paths[i % len(paths)], (("dress", "shirt", "toptee")[i % 3],)) for i in range(size)],
              rng.standard_normal((size, encoder.dim), dtype=np.float32))
    torch.manual_seed(0)
    return SearchEngine(index, encoder, Combiner(encoder.dim)), [f"item{i}" for i in range(0, size, 97)], paths


def _calls(api: str, engine: SearchEngine, ids: list[str], paths: list[str], url: str | None):
    """Each query kind as a function of the request number, through ``api``; each returns its number of results."""
    photos = [Path(p).read_bytes() for p in paths[:8]]
    if api == "engine":
        from clip4cir.data.images import decode_image
        images = [decode_image(b, "photo") for b in photos]
        return {"composed_reference": lambda i: len(engine.composed_search(CAPTIONS[i % 3], reference_id=ids[
                    i % len(ids)], k=K).hits),
                "composed_upload": lambda i: len(engine.composed_search(CAPTIONS[i % 3], image=images[i % 8],
                                                                        k=K).hits),
                "text": lambda i: len(engine.text_search(CAPTIONS[i % 3], k=K).hits)}
    if api == "json":
        encoded = [base64.b64encode(b).decode() for b in photos]

        def post(body: dict) -> int:
            request = urllib.request.Request(f"{url}api/search", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return len(json.loads(response.read())["results"])
        return {"composed_reference": lambda i: post({"kind": "composed", "caption": CAPTIONS[i % 3],
                                                      "reference_id": ids[i % len(ids)], "k": K}),
                "composed_upload": lambda i: post({"kind": "composed", "caption": CAPTIONS[i % 3],
                                                   "image_base64": encoded[i % 8], "k": K}),
                "text": lambda i: post({"kind": "text", "caption": CAPTIONS[i % 3], "k": K})}
    from gradio_client import Client, handle_file
    local = threading.local()

    def client() -> Client:  # one client per thread, as separate users have
        if not hasattr(local, "client"):
            local.client = Client(url, verbose=False)
        return local.client
    return {"composed_reference": lambda i: len(client().predict(caption=CAPTIONS[i % 3], reference_id=ids[
                i % len(ids)], k=K, api_name="/composed_search")["results"]),
            "composed_upload": lambda i: len(client().predict(caption=CAPTIONS[i % 3], image=handle_file(paths[
                i % 8]), k=K, api_name="/composed_search")["results"]),
            "text": lambda i: len(client().predict(caption=CAPTIONS[i % 3], k=K, api_name="/text_search")["results"])}


def load(call, requests: int, clients: int) -> dict:
    """``requests`` calls from ``clients`` threads at once (after a warm-up): latency p50/p99 and throughput."""
    for i in range(3):
        call(i)
    times: list[float] = []
    counts: list[int] = []
    lock = threading.Lock()
    ticket = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                i = next(ticket, None)
            if i is None:
                return
            t0 = time.perf_counter()
            n = call(i)
            with lock:
                times.append(time.perf_counter() - t0)
                counts.append(n)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if set(counts) != {K}:
        raise RuntimeError(f"answers held {sorted(set(counts))} results, not {K}")
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "qps": round(requests / wall, 1)}


def run_serving(config: str, out: Path, work: str | None = None) -> dict:
    """Run the benchmark of ``CONFIGS[config]``; writes serving.json and serving.md into ``out``."""
    from clip4cir.serving.ui import serve
    cfg = CONFIGS[config]
    started = time.perf_counter()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        root = Path(tmp) / "catalog"
        make_synthetic_fashioniq(root, "tiny", seed=0)
        engine, ids, paths = catalog_engine(cfg["model"], root, cfg["gallery"])
        threads = configure_serving_threads()
        reference = engine.towers
        for runtime in cfg["runtimes"]:
            towers = reference if runtime == "torch" else \
                load_towers(engine.encoder, runtime, Path(tmp), threads["torch"])
            engine.towers, engine.runtime_note = BatchedTowers(towers), towers.describe()
            port = free_port()
            ui = serve(engine, Path(tmp) / "app-cache", port=port, quiet=True) \
                if set(cfg["apis"]) - {"engine"} else None
            try:
                for api in cfg["apis"]:
                    calls = _calls(api, engine, ids, paths, f"http://127.0.0.1:{port}/")
                    for query, call in calls.items():
                        for clients in cfg["clients"]:
                            print(f"serving: {runtime} {api} {query} × {clients}", flush=True)
                            results.append({"runtime": runtime, "api": api, "query": query, "clients": clients,
                                            **load(call, cfg["requests"], clients)})
            finally:
                if ui is not None:
                    ui.close()
        engine.towers = reference
    m = machine()
    report = {"config": config, "command": f"python scripts/benchmark.py serving --config {config}",
              "machine": f"{m['cpu']}, {m['cores']} cores, torch {m['versions']['torch']}", "model": cfg["model"],
              "gallery": cfg["gallery"], "requests": cfg["requests"], "results": results,
              "seconds": round(time.perf_counter() - started, 1)}
    write_report(out, stem_for("serving", config, "full"), report, markdown)
    return report


def markdown(report: dict) -> str:
    rows = report["results"]
    clients = sorted({r["clients"] for r in rows})
    lines = [f"Machine: {report['machine']}; {report['model']} (random weights), {report['gallery']:,} items, "
             f"{report['requests']} requests per cell; command: `{report['command']}`.", "",
             "| runtime | through | query | " + " | ".join(f"{c} client{'s' if c > 1 else ''}: p50 / p99 ms, q/s"
                                                       for c in clients) + " |",
             "|---" * (3 + len(clients)) + "|"]
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["runtime"], r["api"], r["query"]), {})[r["clients"]] = r
    for (runtime, api, query), by_clients in cells.items():
        lines.append(f"| {runtime} | {api} | {query} | " + " | ".join(
            f"{by_clients[c]['p50_ms']} / {by_clients[c]['p99_ms']}, {by_clients[c]['qps']}" if c in by_clients
            else "-" for c in clients) + " |")
    return "\n".join(lines) + "\n"

