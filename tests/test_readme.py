"""The Python examples of the README and docs/ run as written: loading an encoder file without this project, and
the search engine over an index (the files they name are made here, with those names)."""
import os

import pytest
from helpers import code_blocks
from PIL import Image

from clip4cir.data.sources import open_source
from clip4cir.models.combiner import Combiner, save_combiner
from clip4cir.models.encoder_file import save_encoder
from clip4cir.models.factory import create_model
from clip4cir.retrieval.building import BuildOptions, build_index
from clip4cir.retrieval.catalog import catalog_items


def block_with(text: str) -> str:
    found = [block for _, block in code_blocks("python") if text in block]
    assert len(found) == 1, f"one example with {text!r} in the README and docs/ expected, found {len(found)}"
    return found[0]


@pytest.fixture
def in_folder(tmp_path):
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


def test_an_encoder_file_loads_with_open_clip_alone(in_folder):
    encoder = create_model("cir-tiny")
    save_encoder(encoder, in_folder / "best.safetensors")
    scope: dict = {}
    exec(block_with("safe_open"), scope)
    model = scope["model"]
    for (name, a), b in zip(model.state_dict().items(), encoder.model.state_dict().values(), strict=True):
        assert (a == b).all(), name


def test_the_search_engine_example(in_folder):
    catalog = in_folder / "catalog"
    catalog.mkdir()
    for i in range(12):  # ids are the file names: B00ABC and eleven others
        Image.new("RGB", (60, 90), (200 - 15 * i, 30 + 15 * i, 30)).save(catalog / f"B00AB{'CDEFGHIJKLMN'[i]}.jpg")
    Image.new("RGB", (60, 90), (190, 40, 40)).save(in_folder / "photo.jpg")
    encoder = create_model("cir-tiny")
    source = open_source(catalog)
    build_index(encoder, source, catalog_items(source), in_folder / "index", BuildOptions(progress=False))
    save_combiner(Combiner(encoder.dim), in_folder / "combiner.safetensors", encoder.record())
    scope: dict = {}
    exec(block_with("SearchEngine"), scope)
    engine = scope["engine"]
    assert [h.id for h in engine.image_search("photo.jpg", k=1).hits] == ["B00ABC"]
    assert "B00ABC" not in [h.id for h in engine.composed_search("is blue", reference_id="B00ABC", k=3).hits]
