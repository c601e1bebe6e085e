import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from clip4cir.build_index import build_index  # noqa: E402
from clip4cir.catalog import fashioniq_items  # noqa: E402
from clip4cir.models import create_model  # noqa: E402
from clip4cir.search import SearchEngine  # noqa: E402
from clip4cir.service import examples  # noqa: E402
from clip4cir.ui import build_app  # noqa: E402
from combiner.model import Combiner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_root):
    encoder = create_model("cir-tiny")
    index, _ = build_index(encoder, fashioniq_items(tiny_root), source={"fashioniq": str(tiny_root)},
                           progress=False)
    engine = SearchEngine(index, encoder, Combiner(encoder.dim))
    ui = build_app(engine, examples(index))
    ui.queue(default_concurrency_limit=4)
    port = free_port()
    ui.launch(server_port=port, prevent_thread_lock=True, show_error=True, quiet=True)
    yield engine, f"http://127.0.0.1:{port}/"
    ui.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False)


def ids_of(gallery_value):
    return [item["caption"].split(" · ")[-3].replace("★ TARGET", "").strip() for item in gallery_value]


def test_three_endpoints(served, client, tiny_root):
    engine, _ = served
    triplet = json.loads((tiny_root / "captions" / "cap.shirt.val.json").read_text())[0]
    path = engine.index.item(triplet["candidate"]).path
    items, info = client.predict(handle_file(path), "is blue", "shirt", 5, "Sum", "", "", api_name="/composed_search")
    assert len(items) == 5 and "results in" in info
    assert all(" · shirt · " in i["caption"] for i in items) and all(Path(i["image"]).is_file() for i in items)
    expected = [h.id for h in engine.composed_search("is blue", image=path, k=5, category="shirt", mode="sum").hits]
    assert ids_of(items) == expected
    # by catalog id, with the known target marked when it is found
    items, _ = client.predict(None, "is blue", "all", 50, "Combiner", triplet["candidate"], triplet["target"],
                              api_name="/composed_search")
    found = [i["caption"] for i in items if i["caption"].startswith("★ TARGET")]
    assert len(items) == 50 and len(found) == (triplet["target"] in ids_of(items))
    assert triplet["candidate"] not in ids_of(items)
    items, info = client.predict(handle_file(path), "auto", 3, api_name="/image_search")
    assert ids_of(items)[0] == triplet["candidate"] and "predicted category" in info
    items, info = client.predict("a red dress", "dress", 4, api_name="/text_search")
    assert len(items) == 4 and all(" · dress · " in i["caption"] for i in items)


def test_bad_inputs_give_messages_and_the_app_stays_up(served, client, tmp_path):
    engine, _ = served
    some = engine.index.item(next(iter(engine.index.row_of))).path
    items, info = client.predict(handle_file(some), "", "all", 5, "Sum", "", "", api_name="/composed_search")
    assert items == [] and "caption is empty" in info
    items, info = client.predict(None, "is red", "all", 5, "Sum", "", "", api_name="/composed_search")
    assert items == [] and "no reference" in info
    items, info = client.predict(None, "all", 5, api_name="/image_search")
    assert items == [] and "no image" in info
    items, info = client.predict(" ".join(["very long caption words"] * 170), "all", 3, api_name="/text_search")
    assert len(items) == 3 and "tokens" in info
    for mode in ("RGBA", "L", "CMYK", "P"):
        image = Image.new("RGB", (60, 90), (30, 60, 200)).convert(mode)
        path = tmp_path / f"q-{mode}.{'tiff' if mode == 'CMYK' else 'png'}"
        image.save(path)
        items, info = client.predict(handle_file(str(path)), "all", 2, api_name="/image_search")
        assert len(items) == 2, (mode, info)
    huge = tmp_path / "huge.jpg"
    Image.new("RGB", (8000, 6000), (200, 30, 30)).save(huge, quality=50)
    items, _ = client.predict(handle_file(str(huge)), "is darker", "all", 3, "Sum", "", "", api_name="/composed_search")
    assert len(items) == 3
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")
    with pytest.raises(Exception):  # rejected by the image component, with a message
        client.predict(handle_file(str(not_image)), "all", 2, api_name="/image_search")
    items, _ = client.predict("red", "all", 2, api_name="/text_search")  # still up
    assert len(items) == 2


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Chromium is not installed at {CHROMIUM} "
                    "(apt-get install -y chromium; .ci/run installs it)")
def test_browser_composed_search_and_refine(served, tmp_path):
    from playwright.sync_api import sync_playwright
    engine, url = served
    ARTIFACTS.mkdir(exist_ok=True)
    upload = tmp_path / "upload.png"
    Image.open(engine.index.item(next(iter(engine.index.row_of))).path).save(upload)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 1300})
        page.goto(url)
        page.wait_for_selector("#composed-search")
        page.set_input_files("#reference input[type=file]", str(upload))
        page.wait_for_selector("#reference img")
        page.fill("#caption textarea", "is red with short sleeves")
        page.click("#composed-search")
        page.wait_for_selector("#composed-results .grid-container img", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "composed-search.png"), full_page=True)
        assert page.locator("#composed-results .grid-container img").count() == 10
        first = page.locator("#composed-results .grid-container button").first
        clicked = first.inner_text()  # the caption: "id · category · score"
        first.click()
        page.wait_for_function("document.querySelector('#reference-id textarea, #reference-id input').value !== ''")
        reference_id = page.locator("#reference-id textarea, #reference-id input").first.input_value()
        assert reference_id and clicked.startswith(reference_id)
        page.fill("#caption textarea", "is darker")
        page.click("#composed-search")
        page.wait_for_function(
            "document.querySelector('#composed-info')"
            " && document.querySelector('#composed-info').innerText.includes('results')")
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "composed-refined.png"), full_page=True)
        captions = page.locator("#composed-results .grid-container").inner_text()
        assert reference_id not in captions  # the new reference itself is left out of its results
        browser.close()


def start_app(args: list[str], env: dict, port: int) -> tuple[subprocess.Popen, Client]:
    """Run app.py as a user would and wait until it answers."""
    process = subprocess.Popen([sys.executable, "app.py"] + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited: {process.stdout.read()}")
        try:
            return process, Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:
            time.sleep(1)
    process.kill()
    raise AssertionError("the app did not start")


def stop(process: subprocess.Popen) -> str:
    process.terminate()
    return process.communicate(timeout=20)[0]


@pytest.mark.slow
def test_readme_start_command_serves_the_offline_demo(tmp_path):
    port = free_port()
    env = {**os.environ, "CLIP4CIR_CACHE": str(tmp_path / "cache"), "CLIP4CIR_PORT": str(port),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process, client = start_app([], env, port)
    try:
        items, info = client.predict("a blue dress", "dress", 5, api_name="/text_search")
        assert len(items) == 5 and "results in" in info
        index_dirs = list((tmp_path / "cache" / "indexes").iterdir())
        assert len(index_dirs) == 1
    finally:
        stop(process)
    # second start: catalog and index come from the cache; a share link cannot be made offline, the app runs on
    process, client = start_app(["--share"], env, port)
    try:
        items, _ = client.predict("a red shirt", "shirt", 3, api_name="/text_search")
        assert len(items) == 3 and list((tmp_path / "cache" / "indexes").iterdir()) == index_dirs
    finally:
        output = stop(process)
    assert "could not create a Gradio share link" in output and "Traceback" not in output
