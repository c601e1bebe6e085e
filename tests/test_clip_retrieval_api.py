"""clip-retrieval's back-end API on the demo app (clip4cir.serving.clip_retrieval_api): the requests its clients
send (``ClipClient``'s JSON without a Content-Type, the front end's text/plain body with empty aesthetic fields)
get what our JSON API gives; composed queries; bad fields; image URLs off by default and never to the server's
own network. The real ``ClipClient`` and front end, installed from PyPI, are in test_clip_retrieval_clients."""
import base64
import http.server
import io
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from clip4cir.core.errors import SearchError
from clip4cir.serving import image_urls


@pytest.fixture(scope="module")
def demo(served_demo):
    return served_demo


def call(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, object, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {})  # no Content-Type unless given
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def knn(base: str, **fields) -> tuple[int, object]:
    status, body, _ = call(base + "/knn-service", json.dumps({"modality": "image", "num_images": 10,
                                                             "indice_name": "clip4cir", **fields}).encode())
    return status, body


def ids(records) -> list[str]:
    return [r["id"] for r in records]


def test_text_image_and_embedding_queries_answer_as_our_api_does(demo):
    engine, base = demo
    status, text = knn(base, text="a red striped dress")
    assert status == 200 and ids(text) == [h.id for h in engine.text_search("a red striped dress", 10, "all").hits]
    assert {"id", "similarity", "url", "caption"} <= set(text[0]) and text[0]["caption"]
    assert text[0]["similarity"] >= text[-1]["similarity"]
    with urllib.request.urlopen(text[0]["url"], timeout=30) as response:  # the front end shows this URL
        assert response.headers["Content-Type"].startswith("image/")
    reference = engine.index.item(text[0]["id"])
    photo = base64.b64encode(open(reference.path, "rb").read()).decode()
    status, image = knn(base, image=photo)
    assert status == 200 and ids(image) == [h.id for h in engine.image_search(reference.path, 10, "all").hits]
    assert image[0]["id"] == reference.id  # the photo of an item finds the item first
    feature = engine.index.feature(reference.id).tolist()
    status, embedded = knn(base, embedding_input=feature)
    assert status == 200 and embedded[0]["id"] == reference.id


def test_text_and_image_together_are_a_composed_query(demo):
    engine, base = demo
    reference_id, captions = next(iter(engine.index.captions.items()))
    caption = captions[0][0]
    path = engine.index.item(reference_id).path
    photo = base64.b64encode(open(path, "rb").read()).decode()
    status, composed = knn(base, text=caption, image=photo, mode="sum")
    expected = engine.composed_search(caption, path, None, 10, None, "sum")
    assert status == 200 and ids(composed) == [h.id for h in expected.hits]
    assert ids(composed) != ids(knn(base, text=caption)[1])  # not the text alone, as clip back would answer


def test_the_front_ends_request_and_the_listing_routes(demo):
    engine, base = demo
    body = json.dumps({"text": "a blue shirt", "image": None, "image_url": None, "embedding_input": None,
                       "modality": "image", "num_images": 5, "indice_name": "clip4cir", "num_result_ids": 20,
                       "use_mclip": False, "deduplicate": True, "use_safety_model": True,
                       "use_violence_detector": True, "aesthetic_score": "", "aesthetic_weight": ""}).encode()
    status, found, headers = call(base + "/knn-service", body, {"Content-Type": "text/plain;charset=UTF-8"})
    assert status == 200 and 1 <= len(found) <= 5 and headers.get("access-control-allow-origin") == "*"
    assert call(base + "/indices-list")[1] == ["clip4cir"]
    config = call(base + "/config.json")[1]
    assert config == {"defaultBackend": base, "defaultIndex": "clip4cir"}
    status, metas, _ = call(base + "/metadata", json.dumps({"ids": [found[0]["id"], "nope"],
                                                            "indice_name": "clip4cir"}).encode())
    assert status == 200 and metas[0]["metadata"]["caption"] == engine.index.titles[found[0]["id"]]
    assert metas[1] == {"id": "nope", "metadata": None}


def test_deduplicate_drops_results_nearly_identical_to_a_better_one(demo):
    engine, base = demo
    _, plain = knn(base, text="a dress", num_images=40, deduplicate=False)
    _, unique = knn(base, text="a dress", num_images=40, deduplicate=True)
    vectors = {i: engine.index.feature(i) / np.linalg.norm(engine.index.feature(i)) for i in ids(plain)}
    kept = ids(unique)
    assert kept == [i for i in ids(plain) if i in set(kept)] and len(kept) < len(plain)  # the same order, fewer
    assert all(float(vectors[a] @ vectors[b]) <= 0.94 for n, a in enumerate(kept) for b in kept[:n])
    dropped = [i for i in ids(plain) if i not in set(kept)]
    assert all(any(float(vectors[d] @ vectors[b]) > 0.94 for b in ids(plain)[:ids(plain).index(d)]) for d in dropped)


@pytest.mark.parametrize("fields, status, words", [
    ({"indice_name": "laion5B"}, 404, "no index 'laion5B'"),
    ({"text": 5}, 422, "text must be a str"),
    ({"text": "red", "num_images": 0}, 422, "num_images"),
    ({"text": "red", "num_images": True}, 422, "num_images"),
    ({"embedding_input": [1.0, 2.0]}, 400, "numbers (this index's dimension)"),
    ({"modality": "text", "text": "red"}, 400, "modality 'text'"),
    ({}, 400, "give text, image"),
    ({"image": "not base64!"}, 400, "not base64"),
    ({"image_url": "https://example.com/a.jpg"}, 400, "image_url is off"),
])
def test_bad_requests_are_named(demo, fields, status, words):
    got, body = knn(demo[1], **fields)
    assert got == status and words in body["detail"], body


def test_a_body_that_is_not_json_is_a_400(demo):
    status, body, _ = call(demo[1] + "/knn-service", b"{oops")
    assert status == 400 and "not JSON" in body["detail"]
    status, body, _ = call(demo[1] + "/knn-service", b'{"embedding_input": [NaN]}')
    assert status == 400
    status, body, _ = call(demo[1] + "/knn-service", b"[" * 5000)
    assert status == 400 and "nested" in body["detail"]
    status, body, _ = call(demo[1] + "/knn-service", b'{"embedding_input": [' + b"9" * 400 + b"]}")
    assert status == 400 and "float32" in body["detail"]
    status, body, _ = call(demo[1] + "/knn-service", json.dumps({"text": "red " * 20_000}).encode())
    assert status == 413 and "at most" in body["detail"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/a.jpg", "http://localhost/a.jpg", "http://10.0.0.1/a.jpg",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/a.jpg",
                                 "http://0.0.0.0/a.jpg", "file:///etc/passwd", "ftp://example.com/a.jpg"])
def test_image_urls_never_reach_the_servers_own_network(monkeypatch, url):
    monkeypatch.setenv(image_urls.ALLOW_ENV, "1")
    with pytest.raises(SearchError, match="not on the public internet|http or https"):
        image_urls.fetch_image_url(url)


@pytest.mark.parametrize("address", ["64:ff9b::a00:1", "2002:7f00:1::1", "::ffff:10.0.0.1", "fe80::1",
                                     "2001:0:4136:e378:8000:63bf:f5ff:fffe"])  # NAT64, 6to4, mapped, link, Teredo
def test_an_ipv6_address_carrying_a_private_ipv4_one_is_not_public(address):
    import ipaddress
    assert not image_urls.is_public(ipaddress.ip_address(address))
    assert image_urls.is_public(ipaddress.ip_address("2606:4700:4700::1111"))


@pytest.mark.parametrize("url", ["http://[::1/a.jpg", "http://example.com:abc/a.jpg", "http://example.com:99999/"])
def test_a_url_that_does_not_parse_is_a_named_refusal(monkeypatch, url):
    monkeypatch.setenv(image_urls.ALLOW_ENV, "1")
    with pytest.raises(SearchError, match="not a URL"):
        image_urls.fetch_image_url(url)


def test_an_allowed_image_url_is_fetched_bounded_and_not_redirected(monkeypatch):
    buffer = io.BytesIO()
    Image.new("RGB", (30, 40), (200, 30, 30)).save(buffer, "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":  # a byte a second: each read is quick, the whole is not
                self.send_response(200)
                self.end_headers()
                for _ in range(6):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)
                return
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(buffer.getvalue())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv(image_urls.ALLOW_ENV, "1")
    monkeypatch.setattr(image_urls, "public_addresses", lambda host, port: ["127.0.0.1"])  # this test's only
    try:
        assert image_urls.fetch_image_url(url + "/a.png") == buffer.getvalue()
        with pytest.raises(SearchError, match="302"):
            image_urls.fetch_image_url(url + "/moved")
        with pytest.raises(SearchError, match="more than the 10 bytes"):
            image_urls.fetch_image_url(url + "/a.png", max_bytes=10)
        with pytest.raises(SearchError, match="longer than 2 s"):
            image_urls.fetch_image_url(url + "/slow", timeout=2)
    finally:
        server.shutdown()
