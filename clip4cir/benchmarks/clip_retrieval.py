"""Side by side with clip-retrieval (``python scripts/benchmark.py clip-retrieval``): its ``clip inference``,
``clip index`` (autofaiss) and ``clip back`` against our ``clip4cir index`` and app, in one run on one machine,
with the same model weights on the same catalog.

The model is the demo's encoder (cir-tiny, 64-d features), written as a plain open_clip state dict that both load
(clip-retrieval through its ``open_clip:`` loader, the config registered with ``open_clip.add_model_config``);
each uses its own preprocessing. The catalog is drawn for the run (titled product photos, flat in one folder);
the queries are held out of it: other photos (image queries) and their titles (text queries). clip-retrieval runs
from a virtual environment of its own (``CLIP4CIR_CLIP_RETRIEVAL_VENV``, default ``~/.cache/clip4cir/
clip-retrieval-VERSION``, made with pip when missing: it pins numpy<2 and open-clip-torch<3).

Measured: encoding throughput (whole commands, images/s), index build time and size, Recall@10 of text and image
queries against exact search over each side's own catalog features (the truth computed here with numpy), and
serving p50 / p99 and queries/s at each number of clients for ``clip back``'s ``/knn-service`` (its fastest
setting: the image path as the only metadata, no image inlined, no deduplication), our ``/knn-service`` and our
``/api/search``; and composed
queries (a photo and a change), which only we answer.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from clip4cir.benchmarks.machine import machine
from clip4cir.benchmarks.report import BenchmarkError, stem_for, write_report
from clip4cir.benchmarks.serving import load
from clip4cir.core.ports import free_port
from clip4cir.data.synthetic.corpus import make_pretraining_corpus
from clip4cir.models.encoder_file import load_encoder
from clip4cir.models.factory import create_model
from clip4cir.retrieval.index import CatalogIndex
from clip4cir.retrieval.vector_store import exact_search, normalized
from clip4cir.serving.demo import DEMO_DIR

VERSION = "2.45.0"
VENV_ENV = "CLIP4CIR_CLIP_RETRIEVAL_VENV"
CONFIGS = {
    "smoke": {"images": 400, "queries": 40, "requests": 40, "clients": [1, 4], "composed": 5},
    "full": {"images": 20_000, "queries": 500, "requests": 400, "clients": [1, 8, 16], "composed": 20},
}
K = 10
REPO = Path(__file__).resolve().parents[2]
LAUNCHER = """import sys, open_clip
open_clip.add_model_config(sys.argv.pop(1))
from clip_retrieval.cli import main
sys.argv[0] = "clip"
main()
"""


def clip_retrieval_python() -> Path:
    """The python of clip-retrieval's own virtual environment, made with pip when missing."""
    venv = Path(os.environ.get(VENV_ENV) or Path.home() / ".cache" / "clip4cir" / f"clip-retrieval-{VERSION}")
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"clip-retrieval=={VERSION}", "setuptools<70"],
                       check=True)
    return python


def ours_env() -> dict:
    """Our commands' environment: this checkout importable, installed or not."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run(command: list[str], cwd: Path, what: str, env: dict | None = None) -> float:
    """Run a command; its wall time in seconds. RuntimeError with its output's tail when it fails."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env={**(env or os.environ), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare(root: Path, cfg: dict) -> dict:
    """The catalog, the held-out queries (photos and their titles) and the model file both sides load."""
    make_pretraining_corpus(root / "catalog", cfg["images"], seed=2_000)
    make_pretraining_corpus(root / "queries", cfg["queries"], seed=3_000)
    encoder = load_encoder(DEMO_DIR / "encoder.safetensors", "cpu")
    (root / "model").mkdir(exist_ok=True)
    torch.save({k: v.float() for k, v in encoder.model.state_dict().items()}, root / "model" / "cir-tiny.pt")
    shutil.copy(REPO / "clip4cir" / "models" / "configs" / "cir-tiny.json", root / "model" / "cir-tiny.json")
    pairs = [json.loads(line) for line in (root / "queries" / "pairs.jsonl").read_text().splitlines()]
    return {"photos": [str(root / "queries" / p["image"]) for p in pairs], "titles": [p["text"] for p in pairs]}


def theirs_build(python: Path, root: Path) -> dict:
    """clip inference over the catalog and the query photos, then clip index (autofaiss)."""
    model = f"open_clip:cir-tiny/{root / 'model' / 'cir-tiny.pt'}"
    launcher = root / "launcher.py"
    launcher.write_text(LAUNCHER)
    base = [str(python), str(launcher), str(root / "model")]

    def inference(images: str, out: str) -> float:
        return run(base + ["inference", "--input_dataset", images, "--output_folder", out, "--input_format", "files",
                           "--enable_text", "False", "--clip_model", model, "--num_prepro_workers", "2",
                           "--batch_size", "256", "--use_jit", "False"], root, "clip inference")

    encode_s = inference("catalog/images", "their-emb")
    inference("queries/images", "their-queries")
    index_s = run(base + ["index", "--embeddings_folder", "their-emb", "--index_folder", "their-index"], root,
                  "clip index")
    return {"encode_s": round(encode_s, 1), "index_s": round(index_s, 1),
            "index_bytes": (root / "their-index" / "image.index").stat().st_size,
            "index_kind": json.loads((root / "their-index" / "image.json").read_text()).get("index_key", "?")}


def ours_build(root: Path) -> dict:
    """clip4cir index over the catalog, with the same weights file."""
    seconds = run([sys.executable, "-m", "clip4cir", "index", "--data", "catalog/images", "--model", "cir-tiny",
                   "--pretrained", str(root / "model" / "cir-tiny.pt"), "--output", "our-index", "--quiet",
                   "--workers", "2"], root, "clip4cir index", ours_env())
    meta = json.loads((root / "our-index" / "meta.json").read_text())
    return {"encode_index_s": round(seconds, 1), "index_bytes": folder_bytes(root / "our-index"),
            "index_kind": meta["store"]["kind"]}


def post(url: str, body: dict) -> object:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def knn(base: str, **fields) -> list[dict]:
    return post(base + "/knn-service", {"modality": "image", "num_images": K, "num_result_ids": K,
                                        "indice_name": "clip4cir", "deduplicate": False, **fields})


def api_search(base: str, text: str) -> list[dict]:
    return post(base + "/api/search", {"kind": "text", "caption": text, "k": K, "category": "all"})["results"]


def recall(found: list[list], truth: np.ndarray, names: list) -> float:
    return round(float(np.mean([len({str(f) for f in row} & {str(names[t]) for t in want}) / K
                                for row, want in zip(found, truth, strict=True)])), 4)


def text_features(root: Path, titles: list[str]) -> np.ndarray:
    """The titles' features with the shared weights and open_clip's tokenizer, as both sides encode text."""
    model = create_model("cir-tiny", str(root / "model" / "cir-tiny.pt")).model.eval()
    with torch.inference_mode():
        return normalized(model.encode_text(open_clip.get_tokenizer("cir-tiny")(titles)).numpy())


def our_image_features(root: Path, photos: list[str]) -> np.ndarray:
    encoder = create_model("cir-tiny", str(root / "model" / "cir-tiny.pt"))
    batch = torch.stack([encoder.transform(Image.open(p).convert("RGB")) for p in photos])
    with torch.inference_mode():
        return normalized(encoder.encode_image(batch).numpy())


def recalls(root: Path, queries: dict, theirs_url: str, ours_url: str) -> dict:
    """Recall@10 of held-out text and image queries against exact search over each side's own features."""
    their_catalog = normalized(np.load(root / "their-emb" / "img_emb" / "img_emb_0.npy"))
    their_queries = normalized(np.load(root / "their-queries" / "img_emb" / "img_emb_0.npy"))
    our_vectors = normalized(np.load(root / "our-index" / "vectors.npy", mmap_mode="r"))
    texts = text_features(root, queries["titles"])
    ours_found_text = [[r["id"] for r in knn(ours_url, text=t)] for t in queries["titles"]]
    theirs_found_text = [[r["id"] for r in knn(theirs_url, text=t)] for t in queries["titles"]]
    our_queries = our_image_features(root, queries["photos"])
    ours_found_image = [[r["id"] for r in knn(ours_url, embedding_input=q.tolist())] for q in our_queries]
    theirs_found_image = [[r["id"] for r in knn(theirs_url, embedding_input=q.tolist())] for q in their_queries]
    rows, ids = list(range(len(their_catalog))), index_ids(root)
    return {"theirs": {"text": recall(theirs_found_text, exact_search(their_catalog, texts, K)[1], rows),
                       "image": recall(theirs_found_image, exact_search(their_catalog, their_queries, K)[1], rows)},
            "ours": {"text": recall(ours_found_text, exact_search(our_vectors, texts, K)[1], ids),
                     "image": recall(ours_found_image, exact_search(our_vectors, our_queries, K)[1], ids)}}


def index_ids(root: Path) -> list[str]:
    """Our index's item ids in row order."""
    index = CatalogIndex.load(root / "our-index")
    return [index.table.ids[r].decode("utf-8") for r in range(len(index.table))]


def start(command: list[str], root: Path, url: str, log: Path) -> subprocess.Popen:
    """A server process, once it answers ``url``."""
    with open(log, "w") as out:  # the child keeps its own copy of the file
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} stopped: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return process
        except OSError:
            time.sleep(1)
    process.kill()
    raise RuntimeError(f"{command[:4]} did not answer in 300 s")


def serving(queries: dict, targets: dict, cfg: dict) -> dict:
    """p50 / p99 and queries/s of text queries at each number of clients, for each target."""
    titles = queries["titles"]
    out = {}
    for name, call in targets.items():
        out[name] = {str(c): load(lambda i, call=call: len(call(titles[i % len(titles)])), cfg["requests"], c)
                     for c in cfg["clients"]}
    return out


def composed(queries: dict, theirs_url: str, ours_url: str, n: int) -> dict:
    """Composed queries (a photo and a change): whether each side's answer differs from its text-only answer."""
    changes = ["is red", "is striped", "has long sleeves", "is blue and plain"]
    differs = {"theirs": 0, "ours": 0}
    for i in range(n):
        photo = base64.b64encode(Path(queries["photos"][i]).read_bytes()).decode()
        caption = changes[i % len(changes)]
        for side, url in (("theirs", theirs_url), ("ours", ours_url)):
            both = [r["id"] for r in knn(url, text=caption, image=photo)]
            alone = [r["id"] for r in knn(url, text=caption)]
            differs[side] += both != alone
    return {"queries": n, "answered as composed": differs}


def run_clip_retrieval(config: str, out: Path, work: str | None = None) -> dict:
    """Run the benchmark of ``CONFIGS[config]``; writes clip-retrieval.json and .md into ``out``."""
    cfg = CONFIGS[config]
    python = clip_retrieval_python()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        root = Path(tmp)
        queries = prepare(root, cfg)
        build = {"theirs": theirs_build(python, root), "ours": ours_build(root)}
        their_port, our_port = free_port(), free_port()
        (root / "indices.json").write_text(json.dumps({"clip4cir": str(root / "their-index")}))
        (root / "back").mkdir()  # its working folder: the relative image paths do not resolve from here, so it
        # answers with the path alone, not the image in base64 (its fastest setting with metadata; it needs a column)
        back = start([str(python), str(root / "launcher.py"), str(root / "model"), "back", "--port", str(their_port),
                      "--indices-paths", str(root / "indices.json"), "--clip_model",
                      f"open_clip:cir-tiny/{root / 'model' / 'cir-tiny.pt'}", "--enable_mclip_option", "False",
                      "--use_jit", "False", "--provide_aesthetic_embeddings", "False",
                      "--columns_to_return", '["image_path"]'],
                     root / "back", f"http://127.0.0.1:{their_port}/indices-list", root / "back.log")
        app = start([sys.executable, str(REPO / "app.py"), "--index", "our-index", "--port", str(our_port)], root,
                    f"http://127.0.0.1:{our_port}/indices-list", root / "app.log")
        theirs_url, ours_url = f"http://127.0.0.1:{their_port}", f"http://127.0.0.1:{our_port}"
        try:
            quality = recalls(root, queries, theirs_url, ours_url)
            speed = serving(queries, {
                "clip back /knn-service": lambda t: knn(theirs_url, text=t),
                "ours /knn-service": lambda t: knn(ours_url, text=t),
                "ours /api/search": lambda t: api_search(ours_url, t),
            }, cfg)
            composed_answers = composed(queries, theirs_url, ours_url, cfg["composed"])
        finally:
            back.terminate()
            app.terminate()
            back.wait(30)
            app.wait(30)
    report = {"config": config, "machine": machine(), "clip_retrieval": VERSION, "images": cfg["images"],
              "queries": cfg["queries"], "model": "cir-tiny (the demo's encoder weights, fp32)", "build": build,
              "recall_at_10": quality, "serving": speed, "composed": composed_answers}
    report["targets"] = verdicts(report) if config == "full" else {}
    write_report(out, stem_for("clip-retrieval", config, "full"), report, markdown)
    missed = [name for name, met in report["targets"].items() if not met]
    if missed:
        raise BenchmarkError(f"clip-retrieval: missed {'; '.join(missed)} (see {out}/clip-retrieval.md)")
    return report


def verdicts(report: dict) -> dict[str, bool]:
    """The targets, at 8 clients (else the most measured): twice clip back's queries/s at equal or better
    recall, a p99 no worse, and encoding at least as fast."""
    measured = report["serving"]["clip back /knn-service"]
    clients = "8" if "8" in measured else str(max(int(c) for c in measured))
    theirs, ours = report["serving"]["clip back /knn-service"][clients], report["serving"]["ours /knn-service"][clients]
    r, b, n = report["recall_at_10"], report["build"], report["images"]
    return {f"≥ 2× clip back's queries/s at {clients} clients": ours["qps"] >= 2 * theirs["qps"],
            "recall@10 equal or better (text and image)": all(r["ours"][kind] >= r["theirs"][kind]
                                                              for kind in ("text", "image")),
            f"p99 ≤ clip back's at {clients} clients": ours["p99_ms"] <= theirs["p99_ms"],
            "encoding ≥ 1.0× clip inference's images/s": n / b["ours"]["encode_index_s"] >= n / b["theirs"]["encode_s"]}


def markdown(report: dict) -> str:
    n = report["images"]
    b = report["build"]
    theirs_rate, ours_rate = n / b["theirs"]["encode_s"], n / b["ours"]["encode_index_s"]
    lines = [f"# Side by side with clip-retrieval {report['clip_retrieval']}", "",
             f"`python scripts/benchmark.py clip-retrieval --config {report['config']}`: {n:,} catalog images, "
             f"{report['queries']} held-out queries, model {report['model']}; {report['machine'].get('cpu', '')}.",
             "", "| | clip-retrieval | clip4cir | ratio |", "|---|---|---|---|",
             f"| encoding, images/s (whole command) | {theirs_rate:.0f} (`clip inference`) | {ours_rate:.0f} "
             f"(`clip4cir index`, index included) | {ours_rate / theirs_rate:.2f}× |",
             f"| index build s | {b['theirs']['index_s']} (`clip index`, {b['theirs']['index_kind']}) | "
             f"(in the line above; {b['ours']['index_kind']}) | |",
             f"| index size MB | {b['theirs']['index_bytes'] / 1e6:.1f} | {b['ours']['index_bytes'] / 1e6:.1f} "
             f"(vectors, ids, metadata) | |"]
    r = report["recall_at_10"]
    lines += [f"| Recall@10, text queries | {r['theirs']['text']} | {r['ours']['text']} | |",
              f"| Recall@10, image queries | {r['theirs']['image']} | {r['ours']['image']} | |", "",
              "| server | clients | p50 ms | p99 ms | queries/s |", "|---|---|---|---|---|"]
    for name, cells in report["serving"].items():
        for clients, cell in cells.items():
            lines.append(f"| {name} | {clients} | {cell['p50_ms']} | {cell['p99_ms']} | {cell['qps']} |")
    c = report["composed"]
    lines += ["", f"Composed queries (a photo and a change, {c['queries']}): answered as composed (not as the text "
                  f"alone) by clip back {c['answered as composed']['theirs']}, by clip4cir "
                  f"{c['answered as composed']['ours']}."]
    if report["targets"]:
        lines += ["", "| target | met |", "|---|---|",
                  *[f"| {name} | {'yes' if met else '**no**'} |" for name, met in report["targets"].items()]]
    return "\n".join(lines) + "\n"
