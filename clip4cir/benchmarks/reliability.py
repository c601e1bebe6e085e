"""The reliability benchmark (``python scripts/benchmark.py reliability [--url URL --pid PID]``): mixed good and
hostile traffic from 20 clients at once against a live app, for a bounded time.

Without ``--url`` it starts ``python app.py`` (the demo) on a free port, as a user does, and stops it at the end.
The good queries (composed with a catalog reference and with an uploaded photo, image and text) are taken from
the app's own answers and run serially first, quietly: their results are the reference and their latencies the
quiet p50. Then each client sends, in turn, a good query and a hostile request (oversized and streamed bodies,
non-finite or mistyped ``k``, unknown fields, long captions, a 7000×7000 PNG, bad base64, huge ids, path tricks).
Measured: every request's status against the one expected, server paths or oversized echoes in answers, good
results against serial ones, the good queries' p99 under attack, and the app's peak RSS above idle (from
/proc, so the app must run on this machine; without a pid it is not measured). Targets: no 5xx, every hostile
status as expected, good results identical to serial, peak RSS ≤ 1.5 GB above idle, p99 ≤ 5× the quiet p50; a
missed target makes the run fail (after the table is written).
"""
from __future__ import annotations

import base64
import http.client
import io
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
from PIL import Image

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.report import BenchmarkError, stem_for, write_report
from clip4cir.core.ports import free_port

log = logging.getLogger(__name__)

CONFIGS = {"smoke": {"clients": 20, "seconds": 6}, "full": {"clients": 20, "seconds": 60}}
TARGETS = {"rss_gb": 1.5, "p99_over_quiet_p50": 5.0}
GOOD_CAPTIONS = ("a red dress", "a blue striped shirt", "a white top", "a black dress with long sleeves")
EDITS = ("is red with shorter sleeves", "is darker and has a collar", "is blue instead of white")
K = 10
MAX_ERROR_BODY = 2_000  # bytes an error answer may have (no echo of a huge input)
REPO = Path(__file__).resolve().parents[2]


# --- the app and its memory -------------------------------------------------------------------------------



def start_app(log_file: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """``python app.py --port P`` from the checkout, as a user starts it; returns it once /api/search answers."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(REPO))
    with open(log_file, "wb") as out:
        app = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise BenchmarkError(f"app.py ended with exit code {app.returncode} before serving; see {log_file}")
        try:
            if request(url, "POST", "api/search", _json({"kind": "text", "caption": "a dress", "k": 1}))[0] == 200:
                return app, url
        except OSError:
            pass
        time.sleep(1)
    app.terminate()
    raise BenchmarkError(f"app.py did not answer within {timeout:.0f} s; see {log_file}")


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (``VmRSS``) or its peak since the last reset (``VmHWM``), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise BenchmarkError(f"/proc/{pid}/status has no {field}")


class PeakMemory:
    """The highest resident memory of a process while it is running: the kernel's high-water mark, reset at
    the start (``/proc/PID/clear_refs``), and samples every 20 ms where the reset is not allowed."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, BenchmarkError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        if self.exact:
            self.peak = max(self.peak, rss_bytes(self.pid, "VmHWM"))
        return self.peak


# --- requests ---------------------------------------------------------------------------------------------


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


def request(url: str, method: str, path: str, body: bytes | None = None, chunks: Callable | None = None,
            declared: int | None = None, timeout: float = 120) -> tuple[int | str, bytes, float]:
    """One HTTP request on its own connection: (status, or ``closed`` when the server hung up before
    answering; the answer's body; seconds). ``chunks`` streams the body (chunked); ``declared`` sends that
    Content-Length and then only ``body``."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    started = time.perf_counter()
    try:
        connection.putrequest(method, parts.path.rstrip("/") + "/" + path)
        connection.putheader("Content-Type", "application/json")
        if chunks is not None:
            connection.putheader("Transfer-Encoding", "chunked")
        elif body is not None:
            connection.putheader("Content-Length", str(declared if declared is not None else len(body)))
        connection.endheaders()
        try:
            if chunks is not None:
                for chunk in chunks():
                    connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                connection.send(b"0\r\n\r\n")
            elif body is not None:
                connection.send(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) before the body ended: read what it said
        try:
            response = connection.getresponse()
            return response.status, response.read(), time.perf_counter() - started
        except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
            return "closed", b"", time.perf_counter() - started
    finally:
        connection.close()


def _search(url: str, body: dict) -> dict:
    status, answer, _ = request(url, "POST", "api/search", _json(body))
    if status != 200:
        raise BenchmarkError(f"{url}api/search answered {status} to {json.dumps(body)[:200]}: {answer[:200]!r}")
    return json.loads(answer)


def good_queries(url: str) -> list[dict]:
    """Queries of the kinds shoppers send, built from the app's own catalog: text ones, composed ones with a
    catalog reference and with an uploaded photo (an item's image, fetched from the app), image ones."""
    queries = [{"kind": "text", "caption": c, "k": K} for c in GOOD_CAPTIONS]
    found = [hit for c in GOOD_CAPTIONS for hit in _search(url, {"kind": "text", "caption": c, "k": 3})["results"]]
    ids = list(dict.fromkeys(hit["id"] for hit in found))[:4]
    photos = []
    for item in ids[:2]:
        status, body, _ = request(url, "GET", f"catalog/image/{quote(item, safe='')}")
        if status != 200:
            raise BenchmarkError(f"the image of item {item!r} answered {status}")
        photos.append(base64.b64encode(body).decode())
    queries += [{"kind": "composed", "caption": EDITS[i % len(EDITS)], "reference_id": item, "k": K}
                for i, item in enumerate(ids)]
    queries += [{"kind": "composed", "caption": EDITS[i % len(EDITS)], "image_base64": photo, "k": K}
                for i, photo in enumerate(photos)]
    queries += [{"kind": "image", "image_base64": photo, "k": K} for photo in photos]
    return queries


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 255).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def hostile_requests() -> dict[str, tuple[dict, set]]:
    """Each hostile request (the keyword arguments of ``request``) with the statuses a defended app answers."""
    megabyte = b"[" + b"1," * (2 ** 19 - 1) + b"1]"
    bomb = base64.b64encode(_png(7000)).decode()
    over_image = "A" * ((20 * 2 ** 20 + 3000) * 4 // 3)
    search = {"method": "POST", "path": "api/search"}
    return {
        "body of 300 MB, streamed": ({**search, "chunks": lambda: (megabyte for _ in range(300))}, {413, "closed"}),
        "Content-Length of 300 MB": ({**search, "body": megabyte, "declared": 300 * 2 ** 20}, {413, "closed"}),
        "image over 20 MB": ({**search, "body": _json({"kind": "image", "image_base64": over_image})}, {413}),
        "caption of 1 MB": ({**search, "body": _json({"kind": "text", "caption": "red " * 2 ** 18})}, {413}),
        "caption of 60,000 characters": ({**search, "body": _json({"kind": "text", "caption": "red," * 15_000})},
                                         {200}),
        "k NaN": ({**search, "body": b'{"kind": "text", "caption": "red", "k": NaN}'}, {422}),
        "k Infinity": ({**search, "body": b'{"kind": "text", "caption": "red", "k": Infinity}'}, {422}),
        "k 1e400": ({**search, "body": b'{"kind": "text", "caption": "red", "k": 1e400}'}, {422}),
        'k "5"': ({**search, "body": b'{"kind": "text", "caption": "red", "k": "5"}'}, {422}),
        "k true": ({**search, "body": b'{"kind": "text", "caption": "red", "k": true}'}, {422}),
        "unknown field": ({**search, "body": _json({"kind": "text", "caption": "red", "kk": 5})}, {422}),
        "not JSON": ({**search, "body": b"{kind: text"}, {422}),
        "PNG of 7000 x 7000": ({**search, "body": _json({"kind": "image", "image_base64": bomb, "k": K})}, {200}),
        "not an image": ({**search, "body": _json({"kind": "image", "image_base64": base64.b64encode(
            b"GIF89a" + b"\0" * 64).decode()})}, {400}),
        "not base64": ({**search, "body": _json({"kind": "image", "image_base64": "***"})}, {400}),
        "id of 60,000 characters": ({**search, "body": _json({"kind": "image", "reference_id": "x" * 60_000})},
                                    {404}),
        "unknown category": ({**search, "body": _json({"kind": "text", "caption": "red", "category": "hats"})},
                             {404}),
        "file outside the uploads": ({"method": "GET", "path": "gradio_api/file=/etc/passwd"}, {403, 404}),
        "catalog path traversal": ({"method": "GET", "path": "catalog/image/..%2F..%2F..%2Fetc%2Fpasswd"},
                                   {403, 404}),
    }


def _leaks(body: bytes, secrets: tuple[str, ...]) -> bool:
    text = body.decode("utf-8", "replace")
    return "Traceback" in text or "root:x:" in text or any(s in text for s in secrets)


def _ranked(answer: dict) -> list[tuple[str, float]]:
    return [(hit["id"], hit["score"]) for hit in answer["results"]]


def _same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
    return [i for i, _ in a] == [i for i, _ in b] and all(
        abs(x - y) <= 1e-4 for (_, x), (_, y) in zip(a, b, strict=True))


# --- the run ----------------------------------------------------------------------------------------------


def _good_client(url: str, queries: list[dict], reference: list, start: int, deadline: float, tally: dict,
                 lock: threading.Lock) -> None:
    """Good queries, one after another, until ``deadline``: statuses, latencies, answers equal to serial ones."""
    n = start
    while time.monotonic() < deadline:
        q = n % len(queries)
        status, body, took = request(url, "POST", "api/search", _json(queries[q]))
        same = status == 200 and _same(_ranked(json.loads(body)), reference[q])
        with lock:
            tally["sent"] += 1
            tally["same"] += same
            tally["status"][str(status)] = tally["status"].get(str(status), 0) + 1
            tally["seconds"].append(took)
        n += 1


def _hostile_client(url: str, hostile: dict, turns: Iterator[int], deadline: float, rows: dict,
                    secrets: tuple[str, ...], lock: threading.Lock) -> None:
    """Hostile requests until ``deadline``, each kind in turn across the clients (``turns`` is shared):
    statuses, leaks and oversized answers."""
    names = list(hostile)
    while time.monotonic() < deadline:
        with lock:
            name = names[next(turns) % len(names)]
        kwargs, expected = hostile[name]
        status, body, took = request(url, **kwargs)
        with lock:
            row = rows[name]
            row["sent"] += 1
            row["status"][str(status)] = row["status"].get(str(status), 0) + 1
            row["unexpected"] += status not in expected
            row["leaks"] += _leaks(body, secrets)
            row["oversized"] += status != 200 and len(body) > MAX_ERROR_BODY
            row["seconds"].append(took)


def _together(workers: list[Callable[[], None]]) -> float:
    threads = [threading.Thread(target=w) for w in workers]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def _percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def attack(url: str, pid: int | None, clients: int, seconds: float, secrets: tuple[str, ...]) -> dict:
    """The good queries serially (the reference answers), then half the clients sending good queries for
    ``seconds`` (quiet), then the same with the other half sending hostile requests (the attack)."""
    queries = good_queries(url)
    hostile = hostile_requests()
    reference, serial = [], []
    for q in queries:
        status, body, took = request(url, "POST", "api/search", _json(q))
        if status != 200:
            raise BenchmarkError(f"a good query answered {status} before the attack: {body[:200]!r}")
        reference.append(_ranked(json.loads(body)))
        serial.append(took)
    lock = threading.Lock()
    shoppers = clients // 2
    quiet = {"sent": 0, "same": 0, "status": {}, "seconds": []}
    deadline = time.monotonic() + seconds
    _together([lambda c=c: _good_client(url, queries, reference, c, deadline, quiet, lock) for c in range(shoppers)])
    idle = rss_bytes(pid) if pid else None
    memory = PeakMemory(pid) if pid else None
    good = {"sent": 0, "same": 0, "status": {}, "seconds": []}
    bad = {name: {"sent": 0, "status": {}, "unexpected": 0, "leaks": 0, "oversized": 0, "seconds": []}
           for name in hostile}
    deadline = time.monotonic() + seconds
    turns = itertools.count()
    wall = _together([lambda c=c: _good_client(url, queries, reference, c, deadline, good, lock)
                      for c in range(shoppers)] +
                     [lambda: _hostile_client(url, hostile, turns, deadline, bad, secrets, lock)
                      for _ in range(clients - shoppers)])
    peak = memory.stop() if memory else None
    for name, row in bad.items():
        row["expected"] = sorted(map(str, hostile[name][1]))
        row["p50_ms"] = _percentiles(row.pop("seconds"))["p50_ms"] if row["sent"] else None
    return {"good_queries": len(queries), "shoppers": shoppers, "attackers": clients - shoppers,
            "wall_s": round(wall, 1), "serial_p50_ms": _percentiles(serial)["p50_ms"],
            "quiet": {"sent": quiet["sent"], "identical_to_serial": quiet["same"], "status": quiet["status"],
                      **_percentiles(quiet["seconds"])},
            "good": {"sent": good["sent"], "identical_to_serial": good["same"], "status": good["status"],
                     **_percentiles(good["seconds"])},
            "hostile": bad, "idle_rss_gb": round(idle / 2 ** 30, 3) if idle else None,
            "peak_rss_gb": round(peak / 2 ** 30, 3) if peak else None, "peak_exact": bool(memory and memory.exact)}


def verdicts(result: dict) -> dict[str, bool | None]:
    """Each target: met, missed, or None where it was not measured."""
    every = [result["good"]["status"]] + [row["status"] for row in result["hostile"].values()]
    fives = sum(n for statuses in every for s, n in statuses.items() if s.startswith("5"))
    good, quiet = result["good"], result["quiet"]
    rss = None if result["peak_rss_gb"] is None else \
        result["peak_rss_gb"] - result["idle_rss_gb"] <= TARGETS["rss_gb"]
    return {"no 5xx": fives == 0,
            "hostile statuses as expected": all(r["unexpected"] == 0 and r["sent"] > 0
                                                for r in result["hostile"].values()),
            "no leaks or oversized echoes": all(r["leaks"] == 0 and r["oversized"] == 0
                                                for r in result["hostile"].values()),
            "good results identical to serial": good["sent"] > 0 and all(
                r["identical_to_serial"] == r["sent"] for r in (good, quiet)),
            f"peak RSS ≤ {TARGETS['rss_gb']} GB above idle": rss,
            f"p99 ≤ {TARGETS['p99_over_quiet_p50']:g}× quiet p50":
                good["p99_ms"] <= TARGETS["p99_over_quiet_p50"] * quiet["p50_ms"]}


def run_reliability(config: str, out: Path, work: str | None = None, url: str | None = None,
                    pid: int | None = None) -> dict:
    """Run the benchmark of ``CONFIGS[config]`` against ``url`` (default: the demo app, started here); writes
    reliability.json and reliability.md into ``out``; raises BenchmarkError when a target is missed."""
    cfg = CONFIGS[config]
    app = None
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        if url is None:
            app, url = start_app(Path(tmp) / "app.log")
            pid = app.pid
        elif not url.endswith("/"):
            url += "/"
        try:
            result = attack(url, pid, cfg["clients"], cfg["seconds"], (str(REPO), os.getcwd(), tmp))
        finally:
            if app is not None:
                app.terminate()
                app.wait(30)
    m = machine()
    command = "python scripts/benchmark.py reliability" + ("" if config == "full" else f" --config {config}")
    report = {"config": config, "command": command, "machine": f"{m['cpu']}, {m['cores']} cores",
              "clients": cfg["clients"], "seconds": cfg["seconds"], **result}
    report["targets"] = verdicts(report)
    write_report(out, stem_for("reliability", config, "full"), report, markdown)
    missed = [name for name, met in report["targets"].items() if met is False]
    if missed:
        raise BenchmarkError(f"reliability: missed {'; '.join(missed)} (see {out}/"
                             f"{stem_for('reliability', config, 'full')}.md)")
    return report


def markdown(report: dict) -> str:
    good, quiet = report["good"], report["quiet"]
    rss = "not measured (no --pid)" if report["peak_rss_gb"] is None else \
        f"{report['idle_rss_gb']:.2f} GB idle, {report['peak_rss_gb']:.2f} GB peak" + \
        ("" if report["peak_exact"] else " (sampled every 20 ms)")
    lines = [f"Machine: {report['machine']}; {report['shoppers']} clients sending good queries and "
             f"{report['attackers']} sending hostile requests, for {report['seconds']} s; command: "
             f"`{report['command']}`.", "",
             f"Good queries ({report['good_queries']}: text, composed with a catalog reference and with an upload, "
             f"image): serial p50 {report['serial_p50_ms']} ms.", "",
             "| good queries | sent | identical to serial | statuses | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for name, row in (("quiet (shoppers alone)", quiet), ("under attack", good)):
        statuses = ", ".join(f"{s} × {n}" for s, n in sorted(row["status"].items()))
        lines.append(f"| {name} | {row['sent']} | {row['identical_to_serial']} | {statuses} | {row['p50_ms']} | "
                     f"{row['p99_ms']} |")
    lines += ["", f"App memory during the attack: {rss}.", "",
              "| hostile request | sent | statuses | expected | p50 ms | leaks | oversized answers |",
              "|---|---|---|---|---|---|---|"]
    for name, row in report["hostile"].items():
        statuses = ", ".join(f"{s} × {n}" for s, n in sorted(row["status"].items()))
        lines.append(f"| {name} | {row['sent']} | {statuses} | {' or '.join(row['expected'])} | {row['p50_ms']} | "
                     f"{row['leaks']} | {row['oversized']} |")
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {name} | {'-' if met is None else 'yes' if met else '**no**'} |"
              for name, met in report["targets"].items()]
    return "\n".join(lines) + "\n"
