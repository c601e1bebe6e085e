"""Shared fixtures: a tiny synthetic FashionIQ catalog and the real annotation files."""
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying for a minute
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
from helpers import outside_folder, shared_annotations  # noqa: E402

from clip4cir.data.synthetic import make_synthetic_fashioniq  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny synthetic FashionIQ-layout catalog (read-only for tests: copy it before changing it)."""
    root = tmp_path_factory.mktemp("fiq_tiny")
    make_synthetic_fashioniq(root, "tiny", seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def real_annotations() -> Path:
    """The official FashionIQ annotation files (no images), beside the checkout in shared/."""
    return shared_annotations("fashioniq", "FASHIONIQ_ANNOTATIONS", "captions")


@pytest.fixture
def outside():
    """A fresh folder outside the working and temp directories, removed after the test."""
    folder = outside_folder("clip4cir-test-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def outside_catalog(tiny_root):
    """The tiny catalog copied outside the working and temp directories (where a user's catalog lives)."""
    folder = outside_folder("clip4cir-catalog-")
    shutil.copytree(tiny_root, folder / "fiq")
    yield folder / "fiq"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def milvus_server():
    """A real Milvus standalone server (PyPI ``milvus``) with authorization, its data outside the temp folder, and
    its token in the environment, as a user runs one; stopped after the module."""
    from clip4cir.benchmarks.milvus_server import MilvusServer
    from clip4cir.retrieval.milvus_index import TOKEN_ENV
    folder = outside_folder("clip4cir-milvus-")
    try:
        with MilvusServer(folder, auth=True) as running, pytest.MonkeyPatch.context() as env:
            env.setenv(TOKEN_ENV, running.token)
            yield running
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def served_demo(tmp_path_factory):
    """The shipped demo (its model, φ, catalog and index) served in this process as python app.py serves it:
    (the engine, the server's address without a trailing slash)."""
    from clip4cir.core.ports import free_port
    from clip4cir.serving import service
    from clip4cir.serving.ui import serve
    engine = service.load_engine(service.Options(device="cpu"))
    port = free_port()
    app = serve(engine, tmp_path_factory.mktemp("cache"), port=port, quiet=True)
    yield engine, f"http://127.0.0.1:{port}"
    app.close()

