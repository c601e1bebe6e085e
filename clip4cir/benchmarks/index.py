"""The index benchmark (``python scripts/benchmark.py index``): each index kind measured against exact search on
held-out queries, so that it can fail.

- Data that is not trivially clustered: faiss's ``SyntheticDataset`` construction (a 10-dimensional manifold
  bent into d dimensions by sines), generated block by block so 10M × 640 fits on disk, not in memory; and
  features of real images from the encoder (the synthetic catalog's garments under augmentation).
- Queries held out from what is indexed; the ground truth is exact, computed here by NumPy in blocks from the
  vectors themselves (independent of the index code under test), also within each category.
- Each build and each serving run is its own process: its build time and peak memory are its own. Serving loads
  the saved index (memory-mapped) with the serving thread settings, sweeps nprobe / efSearch, and reports
  Recall@10, p50/p99 single-query latency, batch throughput, resident memory and bytes per vector on disk.
- Writes ``index.json``, ``index.md`` (tables) and ``index-recall-latency.png`` (the curves).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torchvision import transforms as T

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.report import stem_for, write_report
from clip4cir.core.artifacts import atomic_write_text
from clip4cir.data.images import load_image
from clip4cir.data.synthetic import make_synthetic_fashioniq
from clip4cir.models.encoder_file import load_encoder
from clip4cir.retrieval.index import CatalogIndex
from clip4cir.retrieval.item_table import Item
from clip4cir.retrieval.threads import configure_serving_threads
from clip4cir.retrieval.vector_store import KINDS
from clip4cir.serving.demo import DEMO_DIR

K = 10
BLOCK = 65_536
CATEGORY_SHARES = {"a": 0.6, "b": 0.3, "c": 0.1}  # category filters of three sizes
CONFIGS = {
    "smoke": {"sets": [("synthetic", 20_000, 64)], "queries": 100, "kinds": ["flat", "ivf-sq8", "ivf-pq", "hnsw"],
              "efforts": {"ivf": [1, 16], "hnsw": [16]}, "repeats": 50},
    "1m": {"sets": [("synthetic", 1_000_000, 640), ("encoder", 0, 0)], "queries": 1000,
           "kinds": ["flat", "ivf-sq8", "ivf-fp16", "ivf-pq", "hnsw"],
           "efforts": {"ivf": [1, 2, 4, 8, 16, 32, 64, 128], "hnsw": [16, 32, 64, 128, 256]}, "repeats": 300},
    "10m": {"sets": [("synthetic", 10_000_000, 640)], "queries": 1000, "kinds": ["ivf-pq"],
            "efforts": {"ivf": [4, 8, 16, 32, 64, 128]}, "repeats": 300},
}


# ---- data ----------------------------------------------------------------------------------------------------
def synthetic_vectors(path: Path, n: int, d: int, seed: int) -> np.ndarray:
    """faiss.contrib.datasets.SyntheticDataset's vectors (normal 10-d points, a random linear map to d
    dimensions, per-dimension frequencies, a sine), normalised, written block by block to a .npy file."""
    rs = np.random.RandomState(1338)  # the map is the data set's, the points the seed's
    projection, frequency = rs.rand(10, d), rs.rand(d) * 4 + 0.1
    out = open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    points = np.random.default_rng(seed)
    for start in range(0, n, BLOCK):
        x = np.sin(points.standard_normal((min(BLOCK, n - start), 10)) @ projection * frequency).astype(np.float32)
        out[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return out


def encoder_vectors(folder: Path, views: int = 20, queries: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Features of real images: the demo model's features of the demo catalog's garments, each under ``views``
    random augmentations (crop, scale, flip, light). Queries are views of garments kept out of the base."""
    make_synthetic_fashioniq(folder / "catalog", "demo", seed=1)
    paths = sorted((folder / "catalog" / "images").iterdir())
    encoder = load_encoder(DEMO_DIR / "encoder.safetensors")
    augment = T.Compose([T.RandomResizedCrop((100, 72), scale=(0.6, 1.0), ratio=(0.6, 0.8)),
                         T.RandomHorizontalFlip(), T.ColorJitter(0.3, 0.3, 0.2)])
    torch.manual_seed(0)
    held_out = set(np.random.default_rng(0).choice(len(paths), queries, replace=False).tolist())
    base, query = [], []
    with torch.inference_mode():
        for i, path in enumerate(paths):
            image = load_image(path)
            n = 1 if i in held_out else views
            batch = torch.stack([encoder.transform(augment(image)) for _ in range(n)])
            features = encoder.encode_image(batch, normalize=True).numpy()
            (query if i in held_out else base).append(features)
    return np.concatenate(base), np.concatenate(query)


def categories_of(n: int, seed: int) -> np.ndarray:
    """Each base vector's category, drawn at the CATEGORY_SHARES (independently of the vectors)."""
    names = list(CATEGORY_SHARES)
    return np.random.default_rng(seed).choice(len(names), n, p=list(CATEGORY_SHARES.values()))


def ground_truth(base: np.ndarray, queries: np.ndarray, labels: np.ndarray, k: int = K) -> dict[str, np.ndarray]:
    """Exact top-k rows per query over all vectors ("all") and within each category, by NumPy in blocks."""
    groups = ["all"] + list(CATEGORY_SHARES)
    best = {g: (np.full((len(queries), 0), -np.inf, np.float32), np.zeros((len(queries), 0), np.int64))
            for g in groups}
    for start in range(0, len(base), BLOCK):
        block = np.asarray(base[start:start + BLOCK])
        scores = queries @ block.T
        for g in groups:
            s = scores if g == "all" else np.where(labels[start:start + len(block)] == groups.index(g) - 1,
                                              scores, -np.inf)
            top = np.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else \
                np.broadcast_to(np.arange(s.shape[1]), s.shape)
            s_all = np.concatenate([best[g][0], np.take_along_axis(s, top, 1)], 1)
            r_all = np.concatenate([best[g][1], top + start], 1)
            keep = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
            best[g] = (np.take_along_axis(s_all, keep, 1), np.take_along_axis(r_all, keep, 1))
    return {g: rows for g, (_, rows) in best.items()}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


# ---- measuring (each in its own process) ---------------------------------------------------------------------
def _memory() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(line.split()[1]) / 1024
    return fields


def _build(folder: str, base_path: str, labels_path: str, kind: str, result: mp.Queue) -> None:
    base = np.load(base_path, mmap_mode="r")
    names = list(CATEGORY_SHARES)
    labels = np.load(labels_path, mmap_mode="r")
    items = [Item(str(i), "", (names[c],)) for i, c in enumerate(labels.tolist())]
    started = time.perf_counter()
    index = CatalogIndex.create(folder, items, base, kind=kind, target_recall=0.95)
    result.put({"build_s": round(time.perf_counter() - started, 1), "peak_rss_build_mib": round(_memory()["VmHWM"]),
                "tuning": index.tuning, "store": index.store.settings()})


def _busy(stop: threading.Event) -> None:
    """What an app does besides searching: torch encoding queries, with its default threads."""
    x = torch.randn(384, 384)
    while not stop.is_set():
        x = torch.tanh(x @ x)


def _io_read_bytes() -> int:
    """Bytes this process has had read from storage (Linux's /proc/self/io): the file pages it touched cold."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
    except (OSError, StopIteration):
        return -1


def drop_cached(folder: Path) -> None:
    """Evict the folder's files from the page cache (posix_fadvise DONTNEED), so serving starts cold, as after a
    restart, instead of warm from the build that just wrote them."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _latencies(index: CatalogIndex, queries: np.ndarray, repeats: int, effort: int | None,
               category: str | None = None, warmup: int = 0) -> dict:
    """p50/p99 ms of single queries (the first ``warmup`` not counted)."""
    times = []
    for i in range(repeats):
        q = queries[i % len(queries)][None]
        t0 = time.perf_counter()
        index.search(q, K, category, effort)
        times.append(time.perf_counter() - t0)
    ms = np.array(times[warmup:]) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _serve(folder: str, queries_path: str, truth_path: str, efforts: list, repeats: int,
           threads: str, result: mp.Queue) -> None:
    """Serving from a cold start (the index's files dropped from the page cache first): the first single queries'
    latency, the storage read and the memory they cost; then, warm, recall per filter at each effort (None: the
    efforts calibrated per filter), single-query latency, batch throughput and, at the calibrated effort, the
    latency of each category filter. ``threads`` "serving" applies clip4cir.retrieval.threads, "default" keeps
    FAISS's own; with "...+load" torch works in another thread meanwhile, as in the app."""
    if threads.startswith("serving"):
        configure_serving_threads()
    stop = threading.Event()
    busy = threading.Thread(target=_busy, args=(stop,), daemon=True)
    if threads.endswith("+load"):
        busy.start()
    drop_cached(Path(folder))
    before, read_before = _memory(), _io_read_bytes()
    index = CatalogIndex.load(folder)
    loaded = _memory()
    queries = np.load(queries_path)
    truth = dict(np.load(truth_path))
    cold = {**_latencies(index, queries, min(repeats, len(queries)), None),
            "read_mib": round((_io_read_bytes() - read_before) / 2 ** 20, 1)}
    after_cold = _memory()
    cold.update(rss_mib=round(after_cold["VmRSS"]), rss_file_mib=round(after_cold["RssFile"]),
                rss_anon_mib=round(after_cold["RssAnon"]))
    original = np.append(np.asarray(index.table.ids).astype(np.int64), -1)  # row -> data row (the item ids)
    rows = []
    for effort in list(efforts) + [None]:
        row = {"effort": effort, "recall": {}}
        for group, expected in truth.items():
            _, found = index.search(queries, K, None if group == "all" else group, effort)
            row["recall"][group] = round(recall_at_k(original[found], expected), 4)
        row.update(_latencies(index, queries, repeats, effort, warmup=min(10, repeats // 10)))
        t0 = time.perf_counter()
        index.search(queries, K, None, effort)
        row["batch_qps"] = round(len(queries) / (time.perf_counter() - t0), 1)
        if effort is None:
            row["filtered"] = {c: _latencies(index, queries, repeats, None, c, warmup=min(10, repeats // 10))
                               for c in CATEGORY_SHARES}
        rows.append(row)
    stop.set()
    if busy.is_alive():
        busy.join()  # a thread still in torch when the process exits aborts it
    after = _memory()
    result.put({"rows": rows, "cold": cold, "rss_loaded_mib": round(loaded["VmRSS"] - before["VmRSS"]),
                "rss_serving_mib": round(after["VmRSS"]), "rss_anon_serving_mib": round(after["RssAnon"]),
                "rss_file_serving_mib": round(after["RssFile"]), "peak_rss_serving_mib": round(after["VmHWM"]),
                "tuned": index.tuning.get("effort", {}), "tuned_recall": index.tuning.get("recall", {})})


def _in_process(target, *args) -> dict:
    """Run ``target(*args, queue)`` in a fresh process (spawned: nothing inherited) and return what it put."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{target.__name__} failed with exit code {process.exitcode}")
    return queue.get(timeout=10)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _stamped(path: Path, make) -> dict:
    """``make()``'s result, kept in ``path`` (JSON): a benchmark run again with the same ``--work`` folder
    reuses what it already made (data, truth, builds) and measures again."""
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    atomic_write_text(path, json.dumps(value))
    return value


def bench_set(name: str, n: int, d: int, cfg: dict, work: Path, progress=print) -> dict:
    """One data set: generate it, its exact ground truth, then build and serve every kind (each serving run
    starting cold)."""
    work.mkdir(parents=True, exist_ok=True)
    progress(f"index benchmark: {name} data ...")

    def make_data() -> dict:
        if name == "synthetic":
            synthetic_vectors(work / "base.npy", n, d, seed=1)
            synthetic_vectors(work / "queries.npy", cfg["queries"], d, seed=2)
        else:
            base_array, query_array = encoder_vectors(work / "images")
            np.save(work / "base.npy", base_array)
            np.save(work / "queries.npy", query_array)
        base = np.load(work / "base.npy", mmap_mode="r")
        labels = categories_of(len(base), seed=3)
        np.save(work / "labels.npy", labels)
        started = time.perf_counter()
        np.savez(work / "truth.npz", **ground_truth(base, np.load(work / "queries.npy"), labels))
        return {"n": len(base), "dim": base.shape[1], "truth_s": round(time.perf_counter() - started, 1)}

    data = _stamped(work / f"data-{n}x{d}.json", make_data)
    n, d = data["n"], data["dim"]
    out = {"data": name, "n": n, "dim": d, "queries": len(np.load(work / "queries.npy", mmap_mode="r")),
           "truth_s": data["truth_s"], "categories": CATEGORY_SHARES, "kinds": []}

    def built(kind: str) -> tuple[Path, dict]:
        folder = work / f"index-{kind}"
        return folder, _stamped(work / f"built-{kind}.json", lambda: _in_process(
            _build, str(folder), str(work / "base.npy"), str(work / "labels.npy"), kind))

    for kind in cfg["kinds"]:
        progress(f"index benchmark: {name} {n:,} × {d}: {kind} ...")
        folder, build = built(kind)
        family = KINDS[kind].family
        efforts = [] if family == "flat" else cfg["efforts"][family]
        served = _in_process(_serve, str(folder), str(work / "queries.npy"), str(work / "truth.npz"),
                             efforts, cfg["repeats"], "serving")
        out["kinds"].append({"kind": kind, **build, **served, "disk_bytes_per_vector": round(
            folder_bytes(folder) / n, 1), "disk_over_vectors": round(folder_bytes(folder) / (n * d * 4), 3)})
    if name == "synthetic":  # FAISS's default threads against the serving settings, with torch busy meanwhile
        kind = "ivf-sq8" if "ivf-sq8" in cfg["kinds"] else cfg["kinds"][-1]
        folder, _ = built(kind)
        out["threads"] = {"kind": kind, **{mode: _in_process(_serve, str(folder), str(work / "queries.npy"),
                                                              str(work / "truth.npz"), [], cfg["repeats"],
                                                              mode)["rows"][0]
                                            for mode in ("default", "serving", "default+load", "serving+load")}}
    return out


# ---- report --------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; config `{report['config']}`; command: `{report['command']}`.", "",
             "Serving starts cold: the index's files are dropped from the page cache before it loads (as after a "
             "restart); warm figures follow the first pass over the queries.", ""]
    for s in report["sets"]:
        lines += [f"### {s['data']} features, {s['n']:,} × {s['dim']}, {s['queries']} held-out queries "
                  f"(exact truth in {s['truth_s']} s)", "",
                  "| kind | nprobe / efSearch | Recall@10 all | a (60%) | b (30%) | c (10%) | p50 ms | p99 ms | "
                  "batch q/s | build s | peak RSS build MiB | RSS serving MiB (anon / file) | disk B/vector |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in s["kinds"]:
            for row in k["rows"]:
                setting = "exact" if k["kind"] == "flat" else row["effort"] if row["effort"] is not None else \
                    f"calibrated: {k['tuned']} (re-rank ×{k['store']['k_factor']})"
                r = row["recall"]
                lines.append(f"| {k['kind']} | {setting} | "
                             f"{r['all']:.3f} | {r['a']:.3f} | {r['b']:.3f} | {r['c']:.3f} | {row['p50_ms']} | "
                             f"{row['p99_ms']} | {row['batch_qps']} | {k['build_s']} | {k['peak_rss_build_mib']} | "
                             f"{k['rss_serving_mib']} ({k['rss_anon_serving_mib']} / {k['rss_file_serving_mib']}) | "
                             f"{k['disk_bytes_per_vector']} |")
        lines += ["", "Cold start and filtered searches (single queries, calibrated efforts):", "",
                  "| kind | cold p50 / p99 ms | read from storage MiB | RSS after cold MiB (anon / file) | "
                  "warm p50 / p99 ms | filter a p50 / p99 | filter b | filter c |", "|---|---|---|---|---|---|---|---|"]
        for k in s["kinds"]:
            c, warm = k["cold"], k["rows"][-1]
            f = warm.get("filtered", {})
            lines.append(f"| {k['kind']} | {c['p50_ms']} / {c['p99_ms']} | {c['read_mib']} | {c['rss_mib']} "
                         f"({c['rss_anon_mib']} / {c['rss_file_mib']}) | {warm['p50_ms']} / {warm['p99_ms']} | "
                         + " | ".join(f"{f[g]['p50_ms']} / {f[g]['p99_ms']}" for g in CATEGORY_SHARES) + " |")
        for k in s["kinds"]:
            if k["tuned"]:
                lines.append(f"\nCalibrated at build for Recall@10 ≥ 0.95 ({k['kind']}; rule: the smallest effort, "
                             f"then the smallest re-ranking depth, reaching it on {k['tuning']['queries']} queries "
                             f"held out of the codes): effort {k['tuned']} ('' unfiltered, else per category), "
                             f"re-rank depth ×{k['store']['k_factor']}, measured there {k['tuned_recall']}.")
        if "threads" in s:
            t = s["threads"]
            lines.append(f"\nThreads ({t['kind']}, calibrated, single queries, p50 / p99 ms): FAISS's default threads "
                         f"{t['default']['p50_ms']} / {t['default']['p99_ms']}, serving settings "
                         f"(`clip4cir.retrieval.threads`) "
                         f"{t['serving']['p50_ms']} / {t['serving']['p99_ms']}; with torch busy in another thread "
                         f"(as in the app): default {t['default+load']['p50_ms']} / {t['default+load']['p99_ms']}, "
                         f"serving {t['serving+load']['p50_ms']} / {t['serving+load']['p99_ms']}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Recall@10 against p50 latency, a curve per kind (and per data set)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = report["sets"]
    figure, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    for axis, s in zip(axes[0], sets, strict=True):
        for k in s["kinds"]:
            xs, ys = [r["p50_ms"] for r in k["rows"]], [r["recall"]["all"] for r in k["rows"]]
            axis.plot(xs, ys, marker="o", label=k["kind"])
        axis.axhline(0.95, color="grey", linestyle="--", linewidth=1)
        axis.set_xscale("log")
        axis.set_xlabel("p50 latency of one query (ms, log scale)")
        axis.set_ylabel("Recall@10 against exact search")
        axis.set_title(f"{s['data']} features, {s['n']:,} × {s['dim']}")
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_index(config: str, out: Path, work: str | None = None) -> dict:
    """Run the benchmark of ``CONFIGS[config]``; writes index.json, index.md and the plot into ``out``."""
    cfg = CONFIGS[config]
    m = machine()
    report = {"config": config, "command": f"python scripts/benchmark.py index --config {config}",
              "machine": f"{m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, faiss {m['versions']['faiss']}",
              "sets": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # with --work, that folder instead: kept, and reused when run again
        for name, n, d in cfg["sets"]:
            report["sets"].append(bench_set(name, n, d, cfg, Path(work or tmp) / f"{config}-{name}"))
    report["seconds"] = round(time.perf_counter() - started, 1)
    stem = stem_for("index", config, "1m")
    write_report(out, stem, report, markdown)
    plot(report, out / f"{stem}-recall-latency.png")
    return report
