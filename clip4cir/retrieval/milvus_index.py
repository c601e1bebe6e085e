"""The catalog in Milvus: an index whose items and vectors live in one Milvus collection, so any number of app
replicas, on any machines, serve one catalog, and an item added or removed through one is seen by all.

The index folder stays the artifact users pass around (``meta.json``, ``captions.json``, the calibration and
the category probe, ``manifest.json`` written last); its store record names the server (its URI without
credentials), the collection, the Milvus index type and its parameters. The collection holds, per item, its id
(the primary key), the unit-length vector, the feature's length (composed search reuses a catalog item's raw
feature), its image path, and its categories and splits as filterable arrays (``ARRAY_CONTAINS``). Its
description records the encoder and catalog fingerprints; loading refuses a collection whose fingerprint is not
the index's.

Kinds map to Milvus index types: ``flat`` → FLAT (exact), ``ivf-sq8`` → IVF_SQ8, ``ivf-pq`` → IVF_PQ, ``hnsw``
→ HNSW (servers with DISKANN can use it by hand: it is not offered here, as the bundled server lacks it).
Calibration chooses nprobe / ef with the FAISS kinds' loop (clip4cir.retrieval.tuning.calibrate), with the truth
computed exactly from the features being indexed; every category gets its own, as Milvus filters after probing.

Reads are at ``Bounded`` consistency: an add or remove shows in every replica, the writer's included, within
Milvus's graceful time (5 s by default), and no query waits for the newest timestamp as ``Strong`` would (up to
one time tick, 200 ms, a query). Every call has a timeout (``TIMEOUT`` seconds): a server that stops answering
gives the searcher an error, not a hang, and the client reconnects by itself when the server is back. The token
comes from ``CLIP4CIR_MILVUS_TOKEN`` (``user:password`` or an API key) and is never logged or written;
``CLIP4CIR_MILVUS_URI`` points an index folder, when loaded, at another address of the same server (a replica
inside a cluster network).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from clip4cir.core.artifacts import check_destination, read_manifest, write_folder
from clip4cir.core.errors import CatalogIndexError, StoreError, StoreUnavailableError
from clip4cir.core.fingerprints import digest
from clip4cir.retrieval.index import INDEX_VERSION, finite_norms, metric_scores, read_annotations, write_annotations
from clip4cir.retrieval.item_table import Item
from clip4cir.retrieval.tuning import QUERIES, Calibration, K, calibrate, efforts_for
from clip4cir.retrieval.vector_store import DEFAULTS, default_nlist, default_pq_m, exact_search, normalized

log = logging.getLogger(__name__)

INDEX_FORMAT = "clip4cir.index"  # the same artifact as a FAISS index (clip4cir.retrieval.index)
TOKEN_ENV, URI_ENV = "CLIP4CIR_MILVUS_TOKEN", "CLIP4CIR_MILVUS_URI"
TIMEOUT = 5.0  # seconds a Milvus call may take before it is an error
CONSISTENCY = "Bounded"
INSERT_ROWS = 1_000  # rows per insert (a few MB a request)
SEARCH_ROWS = 32  # queries per search request (a calibration sends hundreds)
MAX_WINDOW = 16_384  # Milvus's limit on offset + limit of a query, and on a search's top-k
# kind -> (Milvus index type, its search effort parameter)
MILVUS_KINDS = {"flat": ("FLAT", None), "ivf-sq8": ("IVF_SQ8", "nprobe"), "ivf-pq": ("IVF_PQ", "nprobe"),
                "hnsw": ("HNSW", "ef")}


def milvus_kind(kind: str) -> tuple[str, str | None]:
    """The Milvus index type of a kind and its search effort parameter; CatalogIndexError for a kind it lacks."""
    if kind not in MILVUS_KINDS:
        raise CatalogIndexError(f"--kind {kind} has no Milvus index type here; choose from {', '.join(MILVUS_KINDS)}")
    return MILVUS_KINDS[kind]


def scrub_uri(uri: str) -> str:
    """The URI as it may be shown or written: no user, password, token or query."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return uri.rpartition("@")[2].partition("?")[0]  # host:port without a scheme, or a milvus-lite file
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def quoted(text: str) -> str:
    """A string literal for a Milvus filter expression."""
    return json.dumps(text, ensure_ascii=False)


def ids_filter(ids: Sequence[str]) -> str:
    """``id in [...]`` with every id quoted here (pymilvus pastes ids between quotes unescaped)."""
    return f"id in [{', '.join(quoted(i) for i in ids)}]"


def prefix_filter(prefix: str) -> str:
    """Ids that start with ``prefix``, as a range (a ``like`` pattern cannot hold ``_`` or ``%`` on every
    server)."""
    if not prefix:
        return 'id != ""'
    return f"id >= {quoted(prefix)} and id < {quoted(prefix[:-1] + chr(ord(prefix[-1]) + 1))}"


def category_filter(category: str | None) -> str:
    return f"ARRAY_CONTAINS(categories, {quoted(category)})" if category else ""


class Milvus:
    """A connection to one collection: every call with a timeout, every failure one line naming the server (never
    the token), as StoreUnavailableError when the server does not answer and StoreError otherwise."""

    def __init__(self, uri: str, collection: str, timeout: float = TIMEOUT):
        self.uri, self.shown, self.collection, self.timeout = uri, scrub_uri(uri), collection, timeout
        self._token = os.environ.get(TOKEN_ENV, "")
        self._client, self._answered = None, False
        self._lock = threading.Lock()

    def _message(self, error: Exception) -> str:
        text = " ".join(str(getattr(error, "message", None) or error).split()).replace(self.uri, self.shown)
        password = urllib.parse.urlsplit(self.uri).password or ""
        for secret in filter(None, {self._token, *self._token.split(":"), password}):
            text = text.replace(secret, "***")
        return text[:300]

    def client(self):
        with self._lock:
            if self._client is None:
                try:
                    from pymilvus import MilvusClient  # the [milvus] extra: only an index in Milvus needs it
                except ImportError:
                    raise CatalogIndexError("an index in Milvus needs pymilvus: pip install .[milvus] (or pip "
                                            "install pymilvus)") from None
                logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its tracebacks: ours is one line
                try:
                    self._client = MilvusClient(uri=self.uri, token=self._token, timeout=self.timeout)
                except Exception as e:
                    raise self._error("cannot be reached", e) from None
            return self._client

    def _reachable(self) -> bool:
        """Whether the server's port accepts connections (pymilvus reports refused credentials as a failure to
        connect: a server that is up and refuses the first connection is refusing the token; once one call has
        been answered, a failure to connect is the server or the network)."""
        parts = urllib.parse.urlsplit(self.uri)
        try:
            with socket.create_connection((parts.hostname, parts.port or 19530), timeout=1):
                return True
        except (OSError, TypeError, ValueError):
            return False

    def _error(self, what: str, error: Exception) -> Exception:
        text = self._message(error)
        lowered = text.lower()
        if any(word in lowered for word in ("auth", "credential", "password", "permission", "token")) or \
                ("illegal connection params" in lowered and not self._answered and self._reachable()):
            given = f"the credentials in {TOKEN_ENV}" if self._token else f"the connection ({TOKEN_ENV} is not set)"
            return StoreError(f"the Milvus server at {self.shown} refused {given}: give user:password or an API key "
                              f"(an https server needs an https URI) ({text})")
        if any(word in lowered for word in ("unavailable", "deadline", "timeout", "timed out", "connect",
                                            "fail connecting", "not ready")):
            return StoreUnavailableError(f"the Milvus server at {self.shown} {what}: it does not answer (each call "
                                         f"may take {self.timeout:g} s) ({text}); try again when it is back")
        return StoreError(f"the Milvus server at {self.shown} {what}: {text}")

    def call(self, what: str, method: str, *args, **kwargs):
        """``client.method(collection, ...)`` with the timeout; a failure as described above."""
        client = self.client()
        try:
            try:
                answer = getattr(client, method)(self.collection, *args, timeout=self.timeout, **kwargs)
                self._answered = True
                return answer
            except Exception as e:  # a restarted server may come back with the collection released: load it again
                if "not loaded" not in str(e) or method == "load_collection":
                    raise
                log.warning("collection %s on %s was not loaded; loading it", self.collection, self.shown)
                client.load_collection(self.collection, timeout=self.timeout)
                return getattr(client, method)(self.collection, *args, timeout=self.timeout, **kwargs)
        except Exception as e:
            raise self._error(what, e) from None

    def has_collection(self) -> bool:
        return bool(self.call("could not list its collections", "has_collection"))


def create_collection(db: Milvus, dim: int, index_type: str, params: dict, description: dict) -> None:
    """The collection of one index: the schema above, the vector index, the description (fingerprints)."""
    from pymilvus import DataType
    client = db.client()
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=json.dumps(description))
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=1024)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("norm", DataType.FLOAT)
    schema.add_field("path", DataType.VARCHAR, max_length=4096)
    schema.add_field("categories", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=256, max_length=256)
    schema.add_field("splits", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=16, max_length=64)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=params)
    db.call("could not create the collection", "create_collection", schema=schema, index_params=index_params,
            consistency_level=CONSISTENCY)


def collection_description(db: Milvus) -> dict:
    """What the collection's description records (empty when it was not made by this tool)."""
    text = db.call("could not describe the collection", "describe_collection").get("description") or ""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) and "clip4cir" in record else {}


def not_ours(db: Milvus) -> CatalogIndexError:
    return CatalogIndexError(f"collection {db.collection} on {db.shown} was not made by this tool: choose another "
                             f"--collection (nothing was changed)")


def stored_ids(db: Milvus) -> set[str]:
    """The ids already in the collection (a resumed build inserts only the others)."""
    client = db.client()
    try:  # a Strong count first: the iterator itself reads at an older timestamp (rows just inserted are missed)
        count = int(client.query(db.collection, filter="", output_fields=["count(*)"], timeout=db.timeout,
                                 consistency_level="Strong")[0]["count(*)"])
        iterator = client.query_iterator(db.collection, batch_size=MAX_WINDOW // 2, filter='id != ""',
                                         output_fields=["id"], timeout=db.timeout, consistency_level="Strong")
        found = set()
        while True:
            batch = iterator.next()
            if not batch:
                iterator.close()
                break
            found.update(row["id"] for row in batch)
    except Exception as e:
        raise db._error("could not list the stored ids", e) from None
    if len(found) != count:
        raise CatalogIndexError(f"collection {db.collection} on {db.shown} counts {count:,} items but listed "
                                f"{len(found):,}; try again (nothing was changed)")
    return found


def wait_for_index(db: Milvus, rows: int, progress: Callable[[str], None] | None, limit: float = 3_600.0) -> None:
    """Wait until the vector index covers the ``rows`` stored (Milvus builds it in the background after a flush;
    until then searches scan the rest, and a calibration would measure that; segments too small to index count
    as done once none is pending)."""
    deadline, shown = time.monotonic() + limit, 0.0
    while True:
        state = db.call("could not describe the index", "describe_index", index_name="vector")
        indexed, total = int(state.get("indexed_rows", 0)), int(state.get("total_rows", 0))
        if total >= rows and (indexed >= total or int(state.get("pending_index_rows", 1)) == 0):
            return
        if str(state.get("state", "")).lower() == "failed":
            raise StoreError(f"Milvus could not build the index of {db.collection}: {state}")
        if time.monotonic() > deadline:
            raise CatalogIndexError(f"the index of {db.collection} covers {indexed:,} of {total:,} rows after "
                                    f"{limit:.0f} s; run the build again to resume")
        if progress and time.monotonic() - shown > 30:
            progress(f"Milvus is indexing: {indexed:,} of {total:,} rows")
            shown = time.monotonic()
        time.sleep(1)


def rows_of(items: Sequence[Item], vectors: np.ndarray, norms: np.ndarray) -> list[dict]:
    return [{"id": item.id, "vector": vector.tolist(), "norm": float(norm), "path": item.path,
             "categories": list(item.categories), "splits": list(item.splits)}
            for item, vector, norm in zip(items, vectors, norms, strict=True)]


def insert(db: Milvus, items: Sequence[Item], features: np.ndarray, rows: Sequence[int],
           progress: Callable[[str], None] | None = None) -> None:
    """Insert ``items[rows]`` with their raw ``features[rows]`` (unit vectors and lengths), INSERT_ROWS a request
    (a slice of the features at a time: a catalog larger than memory is not copied whole)."""
    for start in range(0, len(rows), INSERT_ROWS):
        batch = np.asarray(rows[start:start + INSERT_ROWS])
        block = np.asarray(features[batch], dtype=np.float32)
        db.call("could not insert items", "insert", data=rows_of([items[i] for i in batch], normalized(block),
                                                                  finite_norms(block, "features")))
        if progress and (start // INSERT_ROWS) % 100 == 99:
            progress(f"inserted {start + len(batch):,} of {len(rows):,}")


def index_params(kind: str, n: int, dim: int, nlist: int | None, pq_m: int | None, M: int | None) -> dict:
    """The Milvus index parameters of a kind for ``n`` vectors of ``dim`` (the FAISS kinds' defaults)."""
    knob = milvus_kind(kind)[1]
    params = {}
    if knob == "nprobe":
        params["nlist"] = min(nlist or default_nlist(n), 65_536)
    if kind == "ivf-pq":
        params.update(m=pq_m or default_pq_m(dim), nbits=8)
    if knob == "ef":
        params.update(M=M or DEFAULTS["M"], efConstruction=DEFAULTS["ef_construction"])
    return params


def names_of(items: Sequence[Item]) -> dict[str, list[str]]:
    """The categories and splits of the items, sorted."""
    return {"categories": sorted({c for i in items for c in i.categories}),
            "splits": sorted({s for i in items for s in i.splits})}


def open_collection(db: Milvus, dim: int, index_type: str, params: dict, fingerprint: str) -> set[str]:
    """The collection of an index with this fingerprint, created when absent; the ids it holds already (a
    resumed build). A collection of another tool, or of another index, is refused and left as it is."""
    if not db.has_collection():
        create_collection(db, dim, index_type, params, {"clip4cir": 1, "fingerprint": fingerprint, "dim": dim})
        return set()
    found = collection_description(db)
    if not found:
        raise not_ours(db)
    if found.get("fingerprint") != fingerprint:
        raise CatalogIndexError(f"collection {db.collection} on {db.shown} holds another index (fingerprint "
                                f"{found.get('fingerprint')}, this one {fingerprint}: another encoder, catalog or "
                                f"kind); choose another --collection or drop it first")
    return stored_ids(db)


class MilvusIndex:
    """The index interface search and the app use (see clip4cir.retrieval.index.CatalogIndex), over a Milvus
    collection; safe for concurrent searches (each is one request)."""

    def __init__(self, db: Milvus, folder: Path, meta: dict, manifest: dict, captions: dict, titles: dict):
        self.db, self.folder = db, folder
        self.settings = meta["store"]
        self.metric = meta["metric"]
        self.encoder, self.source = manifest.get("encoder", {}), manifest.get("source", {})
        self.probe, self.tuning = meta.get("probe"), meta.get("tuning", {})
        self.captions, self.titles = captions, titles
        self._categories = list(meta["names"].get("categories", []))
        self._count: tuple[float, int] | None = None  # (when, how many): len() is asked on every query

    # ---- what is in it ----------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.settings["dim"]

    @property
    def kind(self) -> str:
        return f"milvus {self.settings['index_type']}"

    def describe_store(self) -> str:
        return f"Milvus at {self.db.shown}, collection {self.db.collection} ({self.settings['index_type']})"

    def __len__(self) -> int:
        if self._count is None or time.monotonic() - self._count[0] > 2.0:
            rows = self.db.call("could not count the items", "query", filter="", output_fields=["count(*)"])
            self._count = (time.monotonic(), int(rows[0]["count(*)"]))
        return self._count[1]

    def categories(self) -> list[str]:
        return sorted(self._categories)

    def _path(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.folder, path))

    def _item(self, row: dict) -> Item:
        return Item(row["id"], self._path(row["path"]), tuple(row["categories"]), tuple(row["splits"]))

    def _get(self, ids: Sequence[str], fields: list[str]) -> list[dict]:
        """The rows of these ids (those that exist), in no particular order."""
        if not ids:
            return []
        wanted, rows = list(dict.fromkeys(ids)), []
        for start in range(0, len(wanted), INSERT_ROWS):  # a filter of at most INSERT_ROWS ids a request
            chunk = wanted[start:start + INSERT_ROWS]
            rows += self.db.call("could not fetch items", "query", filter=ids_filter(chunk), limit=len(chunk),
                                 output_fields=list(dict.fromkeys(["id", *fields])))
        asked = set(wanted)
        return [row for row in rows if row["id"] in asked]

    def __contains__(self, item_id: str) -> bool:
        return isinstance(item_id, str) and bool(self._get([item_id], ["id"]))

    def item(self, item_id: str) -> Item:
        found = self._get([item_id], ["path", "categories", "splits"])
        if not found:
            raise CatalogIndexError(f"unknown item id {item_id!r} (not in this index)")
        return self._item({"id": item_id, **found[0]})

    def feature(self, item_id: str) -> np.ndarray:
        """The raw feature of an item, as the encoder gave it (the stored vector times its length)."""
        found = self._get([item_id], ["vector", "norm"])
        if not found:
            raise CatalogIndexError(f"unknown item id {item_id!r} (not in this index)")
        return np.asarray(found[0]["vector"], dtype=np.float32) * found[0]["norm"]

    def _query_ids(self, filter: str, limit: int, offset: int = 0) -> list[str]:
        rows = self.db.call("could not list items", "query", filter=filter or 'id != ""', output_fields=["id"],
                            limit=limit, offset=offset)
        return [row["id"] for row in rows]

    def ids(self, limit: int | None = None) -> list[str]:
        """Item ids in the collection's order (the first ``limit``; at most 16,384)."""
        return self._query_ids("", min(limit or MAX_WINDOW, MAX_WINDOW))

    def sample(self, n: int, category: str | None = None, seed: int = 0) -> list[str]:
        """The first ``n`` ids (of one category) of a browsing order: the collection's order from an offset the
        seed alone picks (Milvus has no random sampling), so a longer sample continues a shorter one; the first
        16,384 items of the collection can be browsed."""
        self._check_category(category)
        n = min(n, MAX_WINDOW)
        size = min(len(self), MAX_WINDOW)
        offset = (seed * 7919) % max(size - n, 1) if seed else 0
        return self._query_ids(category_filter(category), n, offset) or self._query_ids(category_filter(category),
                                                                                         n)

    def find_ids(self, prefix: str, limit: int = 24) -> list[str]:
        """The first ``limit`` ids, in sorted order, that start with ``prefix`` (among up to 16,384 matches)."""
        return sorted(self._query_ids(prefix_filter(prefix), MAX_WINDOW))[:limit]

    def _check_category(self, category: str | None) -> None:
        """Unknown here may be new elsewhere: a category another replica added is looked up in the collection."""
        if category is not None and category not in self._categories and \
                self._query_ids(category_filter(category), 1):
            self._categories = sorted({*self._categories, category})
        if category is not None and category not in self._categories:
            raise CatalogIndexError(f"unknown category {category!r}; this index has "
                                    f"{', '.join(self.categories()) or 'no categories'}")

    # ---- searching --------------------------------------------------------------------------------------------
    def search_ids(self, queries: np.ndarray, k: int, category: str | None = None, effort: int | None = None,
                   fields: Sequence[str] = ()) -> list[list[dict]]:
        """Top-k hits per unit-length query (``id``, ``distance`` = cosine score, and ``fields``)."""
        self._check_category(category)
        knob = MILVUS_KINDS[self.settings["kind"]][1]
        params = {"metric_type": "IP"}
        if knob:
            effort = effort or self.tuning.get("effort", {}).get(category or "") or self.settings["effort"]
            params["params"] = {knob: max(effort, k) if knob == "ef" else effort}
        queries, found = np.asarray(queries, dtype=np.float32), []
        for start in range(0, len(queries), SEARCH_ROWS):  # each request well within the timeout
            found += self.db.call("could not search", "search", data=queries[start:start + SEARCH_ROWS].tolist(),
                                  limit=min(k, MAX_WINDOW), filter=category_filter(category), search_params=params,
                                  output_fields=list(fields), consistency_level=CONSISTENCY)
        return [[{"id": hit["id"], "distance": hit["distance"], **hit.get("entity", {})} for hit in hits]
                for hits in found]

    def top_items(self, query: np.ndarray, k: int, category: str | None = None) -> list[tuple[Item, float]]:
        query = np.asarray(query, dtype=np.float32)[None]
        finite_norms(query, "query features")
        hits = self.search_ids(normalized(query), k, category, fields=("path", "categories", "splits"))[0]
        scores = metric_scores(np.array([h["distance"] for h in hits], dtype=np.float32), self.metric)
        return [(self._item(h), float(s)) for h, s in zip(hits, scores, strict=True)]

    # ---- changing it ------------------------------------------------------------------------------------------
    def add(self, items: Sequence[Item], features: np.ndarray) -> None:
        """Add items with their raw features; an id already present is an error (nothing is added then)."""
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (len(items), self.dim):
            raise CatalogIndexError(f"expected features of shape ({len(items)}, {self.dim}), got {features.shape}")
        finite_norms(features, "features")  # before anything is inserted
        ids = [item.id for item in items]
        present = self._get(ids, ["id"])
        if present or len(set(ids)) != len(ids):
            raise CatalogIndexError(f"item id {(present[0]['id'] if present else ids[0])!r} is in the index already "
                                    f"or given twice; nothing was added")
        insert(self.db, items, features, range(len(items)))
        self._categories = sorted(set(self._categories) | {c for item in items for c in item.categories})
        self._count = None

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id (once each); unknown ids are an error, and then nothing is removed."""
        ids = list(dict.fromkeys(ids))
        present = {row["id"] for row in self._get(ids, ["id"])}
        missing = [i for i in ids if i not in present]
        if missing:
            raise CatalogIndexError(f"unknown item id {missing[0]!r} (not in this index); nothing was removed")
        self.db.call("could not remove items", "delete", filter=ids_filter(ids))
        self._count = None
        return len(ids)

    # ---- building and loading ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, items: Sequence[Item], features: np.ndarray, *, uri: str,
               collection: str, kind: str = "flat", metric: str = "cosine", encoder: dict | None = None,
               source: dict | None = None, probe: dict | None = None, captions: dict | None = None,
               titles: dict | None = None, target_recall: float | None = None,
               queries: dict[str, np.ndarray] | None = None, progress: Callable[[str], None] | None = None,
               nlist: int | None = None, pq_m: int | None = None, M: int | None = None, **_faiss_only) -> MilvusIndex:
        """Put ``items`` and their raw ``features`` into the collection (created here, or resumed: ids already
        stored are not inserted again), calibrate the approximate kinds, and commit the index folder ``path``."""
        index_type, knob = milvus_kind(kind)
        path = check_destination(path, INDEX_FORMAT)
        say = progress or (lambda message: None)
        records, captions, titles = {"encoder": encoder or {}, "source": source or {}}, captions or {}, titles or {}
        features = np.asarray(features, dtype=np.float32)
        n, dim = features.shape
        params = index_params(kind, n, dim, nlist, pq_m, M)
        fingerprint = digest(records["encoder"].get("fingerprint"), records["source"].get("fingerprint"), kind,
                             params)
        db = Milvus(uri, collection)
        done = open_collection(db, dim, index_type, params, fingerprint)
        todo = [i for i, item in enumerate(items) if item.id not in done]
        say(f"inserting {len(todo):,} items into {collection} on {db.shown}"
            + (f" ({len(done):,} there already)" if done else ""))
        insert(db, items, features, todo, progress)
        db.call("could not flush the collection", "flush")
        wait_for_index(db, n, progress)
        db.call("could not load the collection", "load_collection")
        store = {"name": "milvus", "uri": db.shown, "collection": collection, "kind": kind, "index_type": index_type,
                 "params": params, "effort": 32 if knob == "nprobe" else 128, "consistency": CONSISTENCY,
                 "fingerprint": fingerprint, "dim": dim}
        meta = {"version": INDEX_VERSION, "metric": metric, "names": names_of(items), "store": store, "probe": probe,
                "tuning": {}, "size": n}
        index = cls(db, path, meta, records, captions, titles)
        if knob and target_recall is not None:
            say(f"calibrating for Recall@10 ≥ {target_recall}")
            index.tuning = meta["tuning"] = calibrate(milvus_calibration(index, items, features, queries or {}),
                                                      target_recall)

        def write(tmp: Path) -> None:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            write_annotations(tmp, captions, titles)

        write_folder(path, INDEX_FORMAT, write, records)
        return index

    @staticmethod
    def preflight(uri: str, collection: str, kind: str = "auto") -> None:
        """Before the encoding: the kind has a Milvus index type, the server answers and takes the token, and the
        collection is absent or this tool's."""
        if kind != "auto":
            milvus_kind(kind)
        db = Milvus(uri, collection)
        if db.has_collection() and not collection_description(db):
            raise not_ours(db)

    @classmethod
    def load(cls, path: Path, meta: dict) -> MilvusIndex:
        """Connect to the collection an index folder names, after checking it holds that index."""
        manifest = read_manifest(path, INDEX_FORMAT)
        store = meta["store"]
        db = Milvus(os.environ.get(URI_ENV) or store["uri"], store["collection"])
        if not db.has_collection():
            raise CatalogIndexError(f"index {path}: collection {store['collection']} is not on the Milvus server at "
                                    f"{db.shown}")
        found = collection_description(db).get("fingerprint")
        if found != store["fingerprint"]:
            raise CatalogIndexError(f"index {path} records collection fingerprint {store['fingerprint']}, but "
                                    f"{store['collection']} on {db.shown} holds {found}: it was rebuilt for another "
                                    f"index; build this one again")
        db.call("could not load the collection", "load_collection")
        return cls(db, path.resolve(), meta, manifest, *read_annotations(path))


def milvus_calibration(index: MilvusIndex, items: Sequence[Item], features: np.ndarray,
                       queries: dict[str, np.ndarray]) -> Calibration:
    """What :func:`~clip4cir.retrieval.tuning.calibrate` measures here: held-out items as image queries (each one's
    own item left out of both answers) and every kind of ``queries``, searched in the collection and in each
    category (Milvus filters after probing, so a category needs its own effort), against exact search of
    ``features``; no re-ranking depth to choose."""
    vectors = normalized(features)
    ids = np.array([item.id for item in items], dtype=object)
    held = np.sort(np.random.default_rng(0).choice(len(items), min(QUERIES, max(len(items) // 10, 1)),
                                                   replace=False))
    own = ids[held]
    categories = {c: np.array([c in item.categories for item in items]) for c in index.categories()}

    def top(kind: str, rows: Sequence[Sequence[str]]) -> list[list[str]]:
        return [[i for i in row if kind != "image" or i != own[n]][:K] for n, row in enumerate(rows)]

    def exact(group: str, kind: str, q: np.ndarray) -> list[list[str]]:
        _, rows = exact_search(vectors, q, K + 1, categories.get(group))
        return top(kind, [[ids[r] for r in row if r >= 0] for row in rows])

    def approximate(group: str, kind: str, q: np.ndarray, setting: dict) -> list[list[str]]:
        hits = index.search_ids(q, K + 1, group or None, setting["effort"])
        return top(kind, [[h["id"] for h in row] for row in hits])

    family = "hnsw" if MILVUS_KINDS[index.settings["kind"]][1] == "ef" else "ivf"
    return Calibration(
        kinds={"image": vectors[held], **{k: np.asarray(v, dtype=np.float32) for k, v in queries.items() if len(v)}},
        groups=["", *categories], efforts=efforts_for(family, index.settings["params"].get("nlist", 0)),
        k_factors=(1,), exact=exact, approximate=approximate)
