"""Store benchmark (``scripts/benchmark.py store``): the same catalog in FAISS files and in a real Milvus
standalone server (PyPI ``milvus``, started here on free ports), each approximate kind calibrated to Recall@10
≥ 0.95 on one set of held-out queries and measured on another, against exact NumPy search (the truth is computed
apart from both stores). Per store and kind: build time (insert, index, calibration), Recall@10 over all items
and within the 10% category, p50/p99 of single queries, throughput with 8 concurrent clients, and memory (the
Milvus server's resident memory; FAISS's index files)."""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from clip4cir.benchmarks.index import (
    CATEGORY_SHARES,
    K,
    categories_of,
    folder_bytes,
    ground_truth,
    recall_at_k,
    synthetic_vectors,
)
from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.milvus_server import MilvusServer
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.retrieval.index import CatalogIndex, Item
from clip4cir.retrieval.milvus_index import MilvusIndex

CONFIGS = {
    "smoke": {"n": 5_000, "dim": 32, "queries": 50, "repeats": 50, "clients": 4},
    "full": {"n": 100_000, "dim": 640, "queries": 500, "repeats": 300, "clients": 8},
}
VARIANTS = [("faiss", "flat"), ("faiss", "ivf-sq8"), ("milvus", "flat"), ("milvus", "ivf-sq8"), ("milvus", "hnsw")]
SMALL = "c"  # the 10% category


def _latency(index, queries: np.ndarray, repeats: int, category: str | None) -> dict:
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        index.top_items(queries[i % len(queries)], K, category)
        times.append(time.perf_counter() - started)
    ms = np.array(times[5:]) * 1000  # the first few warm the connection
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def _throughput(index, queries: np.ndarray, clients: int, per_client: int) -> float:
    """Queries a second with ``clients`` threads each sending ``per_client`` queries, one at a time."""
    def client(offset: int) -> None:
        for i in range(per_client):
            index.top_items(queries[(offset + i) % len(queries)], K)

    threads = [threading.Thread(target=client, args=(c * per_client,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(clients * per_client / (time.perf_counter() - started), 1)


def _recall(index, queries: np.ndarray, truth: np.ndarray, category: str | None) -> float:
    found = np.array([[int(item.id[1:]) for item, _ in index.top_items(q, K, category)] for q in queries])
    return round(recall_at_k(found, truth), 4)


def bench_variant(store: str, kind: str, items: list[Item], base: np.ndarray, calibration: np.ndarray,
                  queries: np.ndarray, truth: dict, cfg: dict, work: Path, server: MilvusServer) -> dict:
    folder = work / f"{store}-{kind}"
    target = None if kind == "flat" else 0.95
    started = time.perf_counter()
    options = {"uri": server.uri, "collection": f"bench_{kind.replace('-', '_')}"} if store == "milvus" else {}
    create = MilvusIndex.create if store == "milvus" else CatalogIndex.create
    index = create(folder, items, base, kind=kind, target_recall=target, queries={"text": calibration}, **options)
    build_s = time.perf_counter() - started
    out = {"store": store, "kind": kind, "build_s": round(build_s, 1),
           "effort": (index.tuning.get("effort", {}).get("") if index.tuning else None),
           "recall": _recall(index, queries, truth["all"], None),
           f"recall_{SMALL}": _recall(index, queries, truth[SMALL], SMALL),
           "latency": _latency(index, queries, cfg["repeats"], None),
           f"latency_{SMALL}": _latency(index, queries, cfg["repeats"], SMALL),
           "qps": _throughput(index, queries, cfg["clients"], max(cfg["repeats"] // cfg["clients"], 10))}
    if store == "milvus":
        out["server_mib"] = round(server.memory_mib())
    else:
        out["files_mib"] = round(folder_bytes(folder) / 2 ** 20, 1)
    return out


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; command: `{report['command']}`; {report['n']:,} × {report['dim']} "
             f"synthetic vectors (faiss.contrib's SyntheticDataset), categories {report['categories']}; "
             f"approximate kinds calibrated to Recall@10 ≥ 0.95 on {report['queries']} held-out queries and "
             f"measured on {report['queries']} others against exact NumPy search; Milvus {report['milvus']} "
             f"standalone on this machine (consistency Bounded); {report['clients']} concurrent clients.", "",
             f"| store | kind | effort | build s | R@10 | R@10 in {SMALL} | p50 / p99 ms | p50 / p99 ms in {SMALL} "
             f"| queries/s ({report['clients']} clients) | memory |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        memory = f"server {r['server_mib']:,} MiB" if "server_mib" in r else f"files {r['files_mib']:,} MiB"
        lines.append(f"| {r['store']} | {r['kind']} | {r['effort'] or '-'} | {r['build_s']} | {r['recall']:.3f} | "
                     f"{r[f'recall_{SMALL}']:.3f} | {r['latency']['p50_ms']} / {r['latency']['p99_ms']} | "
                     f"{r[f'latency_{SMALL}']['p50_ms']} / {r[f'latency_{SMALL}']['p99_ms']} | {r['qps']} | "
                     f"{memory} |")
    return "\n".join(lines) + "\n"


def run_store(config: str, out: Path, work: str | None = None) -> dict:
    """Run the benchmark of ``CONFIGS[config]``; writes store.json and store.md into ``out``."""
    from importlib.metadata import version
    cfg = CONFIGS[config]
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        scratch = Path(scratch)
        base = np.asarray(synthetic_vectors(scratch / "base.npy", cfg["n"], cfg["dim"], seed=1))
        calibration = np.asarray(synthetic_vectors(scratch / "calibration.npy", cfg["queries"], cfg["dim"], seed=4))
        queries = np.asarray(synthetic_vectors(scratch / "queries.npy", cfg["queries"], cfg["dim"], seed=2))
        labels = categories_of(len(base), seed=3)
        names = list(CATEGORY_SHARES)
        items = [Item(f"v{i}", f"/catalog/{i}.jpg", (names[label],)) for i, label in enumerate(labels)]
        truth = ground_truth(base, queries, labels)
        rows = []
        with MilvusServer(scratch / "milvus") as server:
            for store, kind in VARIANTS:
                print(f"store benchmark: {store} {kind} ...", flush=True)
                rows.append(bench_variant(store, kind, items, base, calibration, queries, truth, cfg, scratch,
                                          server))
    report = {"config": config, "command": f"python scripts/benchmark.py store --config {config}",
              "machine": "{cpu}, {cores} cores".format(**machine()), "n": cfg["n"], "dim": cfg["dim"],
              "queries": cfg["queries"], "clients": cfg["clients"], "categories": CATEGORY_SHARES,
              "milvus": version("milvus"), "rows": rows}
    write_report(out, stem_for("store", config, "full"), report, markdown)
    return report

