"""The catalog in Milvus, against a real Milvus standalone server (PyPI ``milvus``) with authorization on: the
same results as FAISS, filters, calibration on held-out queries, two app replicas over one collection, and
every failure a user meets (wrong token, server down, interrupted insert, another index's collection)."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from functools import partial

import numpy as np
import pytest
from helpers import REPO, mixture, user_env, wait_until

from clip4cir.commands.build_index import main as build_main
from clip4cir.core.errors import CatalogIndexError, StoreError, StoreUnavailableError
from clip4cir.core.ports import free_port
from clip4cir.models.combiner import Combiner, save_combiner
from clip4cir.models.encoder_file import save_encoder
from clip4cir.models.factory import create_model
from clip4cir.retrieval import milvus_index
from clip4cir.retrieval.index import Item
from clip4cir.retrieval.milvus_index import TOKEN_ENV, Milvus, MilvusIndex
from clip4cir.retrieval.search import SearchEngine
from clip4cir.retrieval.stores import load_index
from clip4cir.retrieval.vector_store import exact_search

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(milvus_server):
    return milvus_server


@pytest.fixture(scope="module")
def built(server, tiny_root, tmp_path_factory):
    """The tiny catalog indexed twice with one encoder by the README's command: FAISS files and a Milvus
    collection."""
    folder = tmp_path_factory.mktemp("milvus-built")
    save_encoder(create_model("cir-tiny"), folder / "enc.safetensors")
    save_combiner(Combiner(create_model("cir-tiny").dim), folder / "combiner.safetensors",
                  create_model("cir-tiny").record())
    common = ["--data", str(tiny_root), "--clip-checkpoint", str(folder / "enc.safetensors"), "--quiet",
              "--workers", "0"]
    assert build_main(common + ["--output", str(folder / "faiss")]) == 0
    assert build_main(common + ["--output", str(folder / "milvus"), "--store", "milvus", "--milvus-uri",
                                server.uri, "--collection", "tiny_flat"]) == 0
    return folder


def engines(built):
    return [SearchEngine.load(built / name, combiner_path=built / "combiner.safetensors", device="cpu")
            for name in ("faiss", "milvus")]


def test_flat_in_milvus_gives_the_faiss_results(built, server):
    faiss_engine, milvus_engine = engines(built)
    assert isinstance(milvus_engine.index, MilvusIndex) and len(milvus_engine.index) == len(faiss_engine.index)
    assert milvus_engine.index.categories() == faiss_engine.index.categories()
    reference = faiss_engine.index.ids(3)[2]
    queries = [lambda e, c: e.composed_search("is red with short sleeves", reference_id=reference, k=10, category=c),
               lambda e, c: e.image_search(reference_id=reference, k=10, category=c),
               lambda e, c: e.text_search("a blue dress", k=10, category=c)]
    for category in [None, "dress", "shirt"]:
        for query in queries:
            expected, got = query(faiss_engine, category), query(milvus_engine, category)
            assert [h.id for h in got.hits] == [h.id for h in expected.hits]
            np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in expected.hits], atol=1e-5)
            if category:
                assert all(category in h.categories for h in got.hits)
    meta = json.loads((built / "milvus" / "meta.json").read_text())
    assert meta["store"]["uri"] == server.uri and meta["store"]["collection"] == "tiny_flat"
    written = "".join(p.read_text() for p in (built / "milvus").iterdir() if p.suffix == ".json")
    assert server.token not in written


def test_an_approximate_kind_reaches_its_target_on_queries_it_was_not_calibrated_on(server, tmp_path):
    x = mixture(6000, 48, clusters=60, seed=1, spread=0.6)
    cats = ["a", "b", "c"]
    items = [Item(f"i{n}", f"/img/{n}.jpg", (cats[n % 3],) if n % 7 else (cats[n % 3], "d")) for n in range(len(x))]
    calibration = mixture(200, 48, clusters=60, seed=2, spread=0.8)
    index = MilvusIndex.create(tmp_path / "ivf", items, x, uri=server.uri, collection="ivf_calibrated",
                               kind="ivf-sq8", target_recall=0.9, queries={"text": calibration})
    assert set(index.tuning["recall"]) == {"", "a", "b", "c", "d"}
    assert all(min(r.values()) >= 0.9 for r in index.tuning["recall"].values()), index.tuning
    held_out = mixture(200, 48, clusters=60, seed=3, spread=0.8)  # truth below is computed without Milvus
    for category in [None, "d"]:
        allowed = None if category is None else np.array([category in i.categories for i in items])
        _, truth = exact_search(x, held_out, 10, allowed)
        hits = index.search_ids(held_out, 10, category)
        recall = np.mean([len({h["id"] for h in row} & {f"i{r}" for r in want}) / 10
                          for row, want in zip(hits, truth, strict=True)])
        assert recall >= 0.85, (category, recall)
    reopened = load_index(tmp_path / "ivf")
    assert reopened.tuning == index.tuning and "IVF_SQ8" in reopened.describe_store()


def api_search(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/search", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def start_replica(built, home, port: int, token: str) -> subprocess.Popen:
    """``python app.py --index`` over the Milvus index, as a replica on another machine would run it."""
    env = {**user_env(home, port), TOKEN_ENV: token}
    return subprocess.Popen([sys.executable, "app.py", "--index", str(built / "milvus"), "--combiner",
                             str(built / "combiner.safetensors"), "--runtime", "torch"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)




def test_two_app_replicas_serve_one_catalog_and_see_each_change(built, server, outside):
    ports = [free_port(), free_port()]
    replicas = [start_replica(built, outside / str(port), port, server.token) for port in ports]
    try:
        for replica, port in zip(replicas, ports, strict=True):
            wait_until(partial(_started_or_ended, replica, port), 240)
            assert replica.poll() is None, replica.stdout.read()
        query = {"kind": "text", "caption": "a red shirt", "k": 8}
        answers = [api_search(port, query) for port in ports]
        assert answers[0][0] == answers[1][0] == 200, answers
        assert [r["id"] for r in answers[0][1]["results"]] == [r["id"] for r in answers[1][1]["results"]]
        index = load_index(built / "milvus")
        reference = answers[0][1]["results"][0]["id"]
        new = Item("added-by-the-shop", index.item(reference).path, ("shirt",), ("val",))
        index.add([new], index.feature(reference)[None] * 1.01)
        same = {"kind": "image", "reference_id": reference, "k": 3}
        assert all(wait_until(lambda p=p: new.id in [r["id"] for r in api_search(p, same)[1].get("results", [])])
                   for p in ports), "an added item did not reach every replica within 15 s"
        index.remove([new.id])
        assert all(wait_until(lambda p=p: api_search(p, {"kind": "image", "reference_id": new.id})[0] == 404)
                   for p in ports), "a removed item stayed in a replica for over 15 s"
    finally:
        for replica in replicas:
            replica.terminate()
            replica.communicate(timeout=30)


def _started_or_ended(replica: subprocess.Popen, port: int) -> bool:
    return replica.poll() is not None or _listening(port)


def _listening(port: int) -> bool:
    try:
        return api_search(port, {"kind": "text", "caption": "a shirt", "k": 1})[0] == 200
    except OSError:
        return False


def test_a_wrong_token_is_one_line_without_the_secret(built, server, monkeypatch, outside):
    monkeypatch.setenv(TOKEN_ENV, "root:not-the-password")
    with pytest.raises(StoreError, match="refused the credentials in") as raised:
        load_index(built / "milvus")
    assert "not-the-password" not in str(raised.value) and "\n" not in str(raised.value)
    port = free_port()
    replica = start_replica(built, outside, port, "root:not-the-password")
    output = replica.communicate(timeout=240)[0]
    assert replica.returncode != 0
    assert "refused the credentials in" in output and "not-the-password" not in output and "Traceback" not in output


def test_an_interrupted_insert_resumes_where_it_stopped(server, tmp_path, monkeypatch):
    x = mixture(700, 16, clusters=20, seed=4)
    items = [Item(f"r{n}", f"/img/{n}.jpg", ("a",)) for n in range(len(x))]
    monkeypatch.setattr(milvus_index, "INSERT_ROWS", 100)
    real_call, inserts, fail_at = Milvus.call, [], [4]

    def counted(self, what, method, *args, **kwargs):
        if method == "insert":
            inserts.append(len(kwargs["data"]))
            if len(inserts) == fail_at[0]:
                raise StoreUnavailableError("the connection dropped (simulated)")
        return real_call(self, what, method, *args, **kwargs)

    monkeypatch.setattr(Milvus, "call", counted)
    with pytest.raises(StoreUnavailableError):
        MilvusIndex.create(tmp_path / "index", items, x, uri=server.uri, collection="resumed")
    assert not (tmp_path / "index").exists()  # nothing committed: the folder appears only when the index is whole
    inserts.clear()
    fail_at[0] = None
    index = MilvusIndex.create(tmp_path / "index", items, x, uri=server.uri, collection="resumed")
    assert sum(inserts) == 400  # the 300 rows stored before the failure were not sent again
    assert len(index) == 700 and sorted(index.ids()) == sorted(i.id for i in items)


def test_a_collection_of_another_index_or_another_tool_is_refused(built, server, tmp_path):
    from pymilvus import MilvusClient
    client = MilvusClient(uri=server.uri, token=server.token)
    client.create_collection("someone_elses", dimension=8)
    client.insert("someone_elses", [{"id": 1, "vector": [0.1] * 8}])
    x = mixture(50, 8, clusters=5, seed=5)
    items = [Item(f"f{n}", f"/img/{n}.jpg", ("a",)) for n in range(len(x))]
    with pytest.raises(CatalogIndexError, match="someone_elses .* was not made by this tool"):
        MilvusIndex.preflight(server.uri, "someone_elses")
    with pytest.raises(CatalogIndexError, match="not made by this tool"):
        MilvusIndex.create(tmp_path / "x", items, x, uri=server.uri, collection="someone_elses")
    assert client.query("someone_elses", filter="", output_fields=["count(*)"],
                        consistency_level="Strong")[0]["count(*)"] == 1
    MilvusIndex.create(tmp_path / "first", items, x, uri=server.uri, collection="shared_name")
    with pytest.raises(CatalogIndexError, match="holds another index"):
        MilvusIndex.create(tmp_path / "second", items, x * 2 + 1, uri=server.uri, collection="shared_name",
                           kind="hnsw", encoder={"fingerprint": "another"})
    client.drop_collection("shared_name")
    MilvusIndex.create(tmp_path / "other", items, x, uri=server.uri, collection="shared_name", kind="hnsw")
    with pytest.raises(CatalogIndexError, match=r"records collection fingerprint \w+, but shared_name .* holds \w+"):
        load_index(tmp_path / "first")


def test_the_environment_variable_points_an_index_at_another_address(built, server, monkeypatch):
    monkeypatch.setenv(milvus_index.URI_ENV, f"http://localhost:{server.ports['proxy-port']}")
    index = load_index(built / "milvus")
    assert f"localhost:{server.ports['proxy-port']}" in index.describe_store() and len(index) > 0
    assert os.environ[TOKEN_ENV] == server.token


class Relay:
    """A TCP relay in front of the server that can fail as a network or a load balancer does: refuse
    connections, or take them and never answer (a hang), and then come back."""

    def __init__(self, target: int):
        self.target, self.port, self.mode, self.sockets = target, free_port(), "up", []
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            self.sockets.append(client)
            if self.mode == "hang":
                continue  # held open, never answered
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def fail(self, mode: str) -> None:
        """``refuse`` or ``hang`` from now on; open connections are cut."""
        self.mode = mode
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sockets = []


@pytest.mark.parametrize("failure", ["refuse", "hang"])
def test_a_server_that_stops_answering_is_an_error_then_serves_again(built, server, monkeypatch, failure):
    relay = Relay(server.ports["proxy-port"])
    monkeypatch.setenv(milvus_index.URI_ENV, f"http://127.0.0.1:{relay.port}")
    engine = engines(built)[1]
    reference = engine.index.ids(1)[0]
    before = _answers(engine, reference)
    assert before
    relay.fail(failure)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=f"Milvus server at http://127.0.0.1:{relay.port}.*try again"):
        engine.text_search("a red shirt", k=5)
    assert time.monotonic() - started < 4 * milvus_index.TIMEOUT  # an error, not a hang
    relay.mode = "up"
    assert wait_until(lambda: _answers(engine, reference) == before, 60), "no recovery once the server was back"


def _answers(engine, reference):
    try:
        return [h.id for h in engine.image_search(reference_id=reference, k=5).hits]
    except StoreUnavailableError:
        return None


def test_any_id_or_category_is_data_never_part_of_a_filter(server, tmp_path):
    ids = ["plain", "it's", 'say "hi"', "x_1", "x%2", "xa", "back\\slash"]
    x = mixture(len(ids), 8, clusters=3, seed=6)
    items = [Item(i, f"/img/{n}.jpg", ("dress 👗",) if n % 2 else ("o'clock",)) for n, i in enumerate(ids)]
    index = MilvusIndex.create(tmp_path / "odd", items, x, uri=server.uri, collection="odd_ids")
    for n, item_id in enumerate(ids):
        assert item_id in index and index.item(item_id).categories == items[n].categories
        np.testing.assert_allclose(index.feature(item_id), x[n], atol=1e-6)
    hostile = "x'] or id != '"
    assert hostile not in index
    with pytest.raises(CatalogIndexError, match="unknown item id"):
        index.remove([hostile])
    assert len(index) == len(ids)
    assert index.find_ids("x_") == ["x_1"] and index.find_ids("x") == ["x%2", "x_1", "xa"]
    assert {item.id for item, _ in index.top_items(x[1], 10, "dress 👗")} == {ids[1], ids[3], ids[5]}
    assert index.remove(["it's"]) == 1
    assert wait_until(lambda: "it's" not in index), "a removed item stayed for over 15 s"
