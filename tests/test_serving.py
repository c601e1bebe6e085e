"""Serving on a CPU: the ONNX Runtime towers against torch, int8 kept only when it agrees, queries batched under
concurrency with a bounded queue, and the plain JSON API with its status codes."""
import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

from clip4cir.core.errors import BusyError
from clip4cir.core.ports import free_port
from clip4cir.data.sources import open_source
from clip4cir.models.combiner import Combiner
from clip4cir.models.encoder_file import save_encoder
from clip4cir.models.factory import create_model, load_model
from clip4cir.models.runtime import Towers, load_towers, resolve_runtime
from clip4cir.retrieval.building import BuildOptions, build_index
from clip4cir.retrieval.catalog import catalog_items
from clip4cir.retrieval.search import SearchEngine
from clip4cir.serving import service
from clip4cir.serving.batching import BatchedTowers
from clip4cir.serving.demo import DEMO_DIR
from clip4cir.serving.ui import serve


@pytest.fixture(scope="module")
def engine(tiny_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving")
    save_encoder(create_model("cir-tiny"), folder / "enc.safetensors")
    encoder = load_model(checkpoint=str(folder / "enc.safetensors"))
    source = open_source(tiny_root)
    index, _ = build_index(encoder, source, catalog_items(source, ["val"]), folder / "index",
                           BuildOptions(progress=False))
    return SearchEngine(index, encoder, Combiner(encoder.dim))


def test_onnx_towers_give_the_torch_features_and_are_made_once(engine, tmp_path, caplog):
    assert resolve_runtime("auto", torch.device("cpu")) == "onnx"
    with caplog.at_level("INFO"):
        towers = load_towers(engine.encoder, "onnx", tmp_path)
    assert "exporting" in caplog.text and min(towers.check.values()) >= 0.999
    images = torch.stack([engine.encoder.transform(Image.new("RGB", (40, 60), (200, 30 * i, 30))) for i in range(3)])
    texts = ["is red with shorter sleeves", "a blue dress"]
    reference = Towers(engine.encoder)
    for got, expected in ((towers.image(images), reference.image(images)), (towers.text(texts), reference.text(texts))):
        cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
        assert cosine.min() >= 0.999
    caplog.clear()
    with caplog.at_level("INFO"):
        load_towers(engine.encoder, "onnx", tmp_path)  # cached under the encoder's fingerprint
    assert "exporting" not in caplog.text


def test_int8_export_of_a_resnet_tower_quantizes_its_matrix_products(tmp_path):
    """A random-init ResNet (RN50's kind, small): the export shares BatchNorm-folded weights through Identity nodes,
    which dynamic quantization could not take; folded first, its matrix products are int8, its convolutions fp32."""
    import onnx
    encoder = create_model("cir-tiny-rn")
    towers = load_towers(encoder, "onnx-int8", tmp_path)
    graph = onnx.load(str(towers.folder / "image.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "MatMulInteger" in ops and "Conv" in ops and "ConvInteger" not in ops
    assert min(towers.check.values()) > 0.95  # int8 is near fp32 (the app's top-10 agreement decides)


def test_int8_is_kept_only_when_its_top10_lists_agree(engine, tmp_path, monkeypatch):
    int8 = load_towers(engine.encoder, "onnx-int8", tmp_path)
    serving = engine.towers
    agreement = service.top10_agreement(engine, int8)
    assert engine.towers is serving  # the engine that serves is never switched to the candidate, even for a moment
    assert set(agreement) == {"text", "composed", "image"} and all(0 <= v <= 1 for v in agreement.values())
    assert service.top10_agreement(engine, Towers(engine.encoder)) == {"text": 1.0, "composed": 1.0, "image": 1.0}
    monkeypatch.setattr(service, "MIN_AGREEMENT", 1.01)  # a bar int8 cannot clear
    towers, note = service.choose_towers(engine, "onnx-int8", tmp_path)
    assert towers.name == "onnx" and "int8 refused" in note
    monkeypatch.setattr(service, "MIN_AGREEMENT", 0.0)
    towers, note = service.choose_towers(engine, "onnx-int8", tmp_path)
    assert towers.name == "onnx-int8" and "agreement" in note
    engine.towers = Towers(engine.encoder)


class SlowTowers(Towers):
    """The torch towers, recording each batch, a little slow (as a real tower is)."""

    def __init__(self, encoder, delay: float = 0.02):
        super().__init__(encoder)
        self.batches, self.delay = [], delay

    def text(self, texts):
        self.batches.append(len(texts))
        time.sleep(self.delay)
        return super().text(texts)


def test_concurrent_queries_are_encoded_together_and_give_the_same_features(engine):
    inner = SlowTowers(engine.encoder)
    batched = BatchedTowers(inner, window=0.01, max_batch=8)
    texts = [f"is colour number {i}" for i in range(16)]
    out = [None] * len(texts)

    def ask(i):
        out[i] = batched.text([texts[i]])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(inner.batches) == 16 and max(inner.batches) > 1 and max(inner.batches) <= 8
    expected = Towers(engine.encoder).text(texts)
    torch.testing.assert_close(torch.cat(out), expected, rtol=1e-4, atol=1e-5)


def test_a_full_queue_refuses_at_once(engine):
    batched = BatchedTowers(SlowTowers(engine.encoder, delay=0.5), window=0.0, max_batch=1, max_pending=2)
    errors, started = [], time.perf_counter()

    def ask():
        try:
            batched.text(["is red"])
        except BusyError as e:
            errors.append((str(e), time.perf_counter() - started))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) >= 3 and all("busy" in message and seconds < 0.4 for message, seconds in errors)


def post(url: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    port = free_port()
    ui = serve(engine, tmp_path_factory.mktemp("cache"), port=port, quiet=True)
    yield f"http://127.0.0.1:{port}"
    ui.close()


def test_the_json_api_answers_like_the_engine(engine, served):
    ref = engine.index.ids(1)[0]
    status, body = post(f"{served}/api/search", {"kind": "text", "caption": "a red dress", "k": 5})
    assert status == 200 and [r["id"] for r in body["results"]] == \
        [h.id for h in engine.text_search("a red dress", k=5).hits]
    status, body = post(f"{served}/api/search", {"kind": "composed", "caption": "is blue", "reference_id": ref,
                                                 "k": 4, "mode": "sum"})
    assert status == 200 and [r["id"] for r in body["results"]] == \
        [h.id for h in engine.composed_search("is blue", reference_id=ref, k=4, mode="sum").hits]
    assert body["results"][0]["thumbnail_url"].startswith(served)
    buffer = io.BytesIO()
    Image.new("RGB", (60, 90), (30, 60, 200)).save(buffer, "PNG")
    status, body = post(f"{served}/api/search", {"kind": "image", "k": 3,
                                                 "image_base64": base64.b64encode(buffer.getvalue()).decode()})
    assert status == 200 and len(body["results"]) == 3


@pytest.mark.parametrize("body, status, says", [
    ({"kind": "composed", "caption": "is red", "reference_id": "nope"}, 404, "'nope'"),
    ({"kind": "text", "caption": "red", "category": "hats"}, 404, "'hats'"),
    ({"kind": "text", "caption": ""}, 400, "caption is empty"),
    ({"kind": "image", "image_base64": base64.b64encode(b"not an image").decode()}, 400, "not an image"),
    ({"kind": "image", "image_base64": "A" * ((20 * 2 ** 20 + 3000) * 4 // 3)}, 413, "20 MB"),
    ({"kind": "text", "caption": "red", "k": 0}, 422, "greater than or equal to 1"),
    ({"kind": "nothing"}, 422, "composed"),
])
def test_the_json_api_says_what_is_wrong(served, body, status, says):
    got, answer = post(f"{served}/api/search", body)
    assert got == status and says in json.dumps(answer), answer


def test_the_json_api_is_documented(served):
    schema = json.loads(urllib.request.urlopen(f"{served}/api/openapi.json", timeout=30).read())
    assert "/api/search" in schema["paths"]
    assert "post" in schema["paths"]["/api/search"]
    assert urllib.request.urlopen(f"{served}/api/docs", timeout=30).status == 200


def test_the_shipped_demo_finds_what_a_description_names():
    """The offline demo's text search: "a red striped dress" gives dresses first, most of the top five red and
    striped (the catalog's own attributes, drawn by the generator, are the truth)."""
    engine = service.load_engine(service.Options(device="cpu"))
    attributes = json.loads((DEMO_DIR / "catalog" / "synthetic_attributes.json").read_text())
    hits = engine.text_search("a red striped dress", k=10).hits
    assert hits[0].categories == ["dress"] and sum(h.categories == ["dress"] for h in hits) >= 8
    assert sum(attributes[h.id]["colour"] == "red" and attributes[h.id]["pattern"] == "striped"
               for h in hits[:5]) >= 3
