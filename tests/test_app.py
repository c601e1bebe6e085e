import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from clip4cir.build_index import build_index  # noqa: E402
from clip4cir.catalog import catalog_items  # noqa: E402
from clip4cir.encoder_file import save_encoder  # noqa: E402
from clip4cir.factory import create_model, load_model  # noqa: E402
from clip4cir.fusion import Combiner  # noqa: E402
from clip4cir.search import SearchEngine  # noqa: E402
from clip4cir.sources import open_source  # noqa: E402
from clip4cir.ui import serve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def served(outside_catalog, tmp_path_factory):
    """The app over a catalog outside the working and temp folders, with an encoder file there too."""
    encoder_file = outside_catalog.parent / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder_file)
    encoder = load_model(checkpoint=str(encoder_file))
    source = open_source(outside_catalog)
    index, _ = build_index(encoder, source, catalog_items(source, ["val"]), outside_catalog.parent / "index",
                           progress=False)
    engine = SearchEngine(index, encoder, Combiner(encoder.dim))
    port = free_port()
    ui = serve(engine, port=port, quiet=True)
    yield engine, f"http://127.0.0.1:{port}/"
    ui.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False)


def ids_of(gallery_value):
    return [item["caption"].split(" · ")[-3].replace("★ TARGET", "").strip() for item in gallery_value]


def test_three_endpoints(served, client, outside_catalog):
    engine, _ = served
    triplet = json.loads((outside_catalog / "captions" / "cap.shirt.val.json").read_text())[0]
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


def test_catalog_images_are_served_and_nothing_else(served, outside_catalog):
    engine, url = served
    assert not str(outside_catalog).startswith(("/tmp", str(REPO)))
    assert http_status(f"{url}gradio_api/file={engine.index.item_at(0).path}") == 200
    assert http_status(f"{url}gradio_api/file={outside_catalog / 'captions' / 'cap.dress.val.json'}") == 403
    assert http_status(f"{url}gradio_api/file={outside_catalog.parent / 'enc.safetensors'}") == 403
    assert http_status(f"{url}gradio_api/file=/etc/passwd") == 403


def test_bad_inputs_give_messages_and_the_app_stays_up(served, client, tmp_path):
    engine, _ = served
    some = engine.index.item(engine.index.ids(1)[0]).path
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
    Image.new("RGB", (8000, 6000), (200, 30, 30)).save(huge, quality=50)  # a JPEG is decoded at a reduced size
    items, _ = client.predict(handle_file(str(huge)), "is darker", "all", 3, "Sum", "", "", api_name="/composed_search")
    assert len(items) == 3
    too_many_pixels = tmp_path / "poster.png"
    Image.new("RGB", (8000, 8000), (200, 30, 30)).save(too_many_pixels)  # 64 megapixels, a small file
    items, info = client.predict(handle_file(str(too_many_pixels)), "all", 2, api_name="/image_search")
    assert items == [] and "poster.png has more than 50 megapixels" in info
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    items, info = client.predict(handle_file(str(not_image)), "all", 2, api_name="/image_search")
    assert items == [] and "notes.jpg is not an image file" in info and "Could not preprocess" not in info
    too_large = tmp_path / "large.png"
    too_large.write_bytes(os.urandom(21 * 2 ** 20))
    with pytest.raises(Exception, match="maximum file size"):
        client.predict(handle_file(str(too_large)), "all", 2, api_name="/image_search")
    items, _ = client.predict("red", "all", 2, api_name="/text_search")  # still up
    assert len(items) == 2


def test_user_text_is_shown_as_typed_not_rendered(served, client):
    engine, _ = served
    some = engine.index.item(engine.index.ids(1)[0]).path
    _, info = client.predict(None, "is red", "all", 2, "Sum", "<img src=x onerror=alert(1)>", "",
                             api_name="/composed_search")
    assert "<img" not in info and "&lt;img src=x onerror=alert(1)&gt;" in info
    _, info = client.predict(handle_file(some), "is red", "# big", 2, "Sum", "", "", api_name="/composed_search")
    assert "\\# big" in info and "\n#" not in info


def test_header_names_the_encoder_file_not_its_path(served):
    engine, url = served
    config = json.loads(urllib.request.urlopen(f"{url}config", timeout=30).read())
    text = json.dumps(config)
    assert "enc.safetensors" in text and str(engine.encoder.source["checkpoint"]) not in text


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Chromium is not installed at {CHROMIUM} "
                    "(apt-get install -y chromium; .ci/run installs it)")
def test_browser_composed_search_and_refine(served, tmp_path):
    from playwright.sync_api import sync_playwright
    engine, url = served
    ARTIFACTS.mkdir(exist_ok=True)
    upload = tmp_path / "upload.png"
    Image.open(engine.index.item(engine.index.ids(1)[0]).path).save(upload)
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


def user_env(home: Path, port: int) -> dict:
    """A new user's environment: HOME somewhere else, no cache or data settings of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP4CIR_")}
    return {**env, "HOME": str(home), "CLIP4CIR_PORT": str(port), "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False"}


def search_each_kind(client: Client, url: str) -> None:
    """A search of each kind through the API, and a result image fetched over HTTP as the browser would."""
    items, info = client.predict("a blue dress", "dress", 5, api_name="/text_search")
    assert len(items) == 5 and "results in" in info, info
    reference = ids_of(items)[0]
    items, info = client.predict(None, "is red", "auto", 5, "Combiner", reference, "", api_name="/composed_search")
    assert len(items) == 5 and reference not in ids_of(items), info
    upload = items[0]["image"]  # a result image, downloaded by the client
    items, info = client.predict(handle_file(upload), "is darker", "all", 4, "Sum", "", "",
                                 api_name="/composed_search")
    assert len(items) == 4, info
    items, info = client.predict(handle_file(upload), "all", 3, api_name="/image_search")
    assert len(items) == 3, info
    # the server-side URL of a result, fetched as the browser fetches it
    raw = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{url}gradio_api/call/text_search", data=json.dumps({"data": ["a red shirt", "shirt", 2]}).encode(),
        headers={"Content-Type": "application/json"}), timeout=30).read())
    stream = urllib.request.urlopen(f"{url}gradio_api/call/text_search/{raw['event_id']}", timeout=60).read().decode()
    data = json.loads(next(line[len("data: "):] for line in stream.splitlines() if line.startswith("data: [")))
    image_url = data[0][0]["image"]["url"]
    assert http_status(image_url) == 200


def test_a_new_machine_runs_the_readme_start_command(outside):
    """`python app.py` with no arguments, HOME a fresh folder outside the working and temp folders (as on a new
    machine or a Space): every kind of search works and result images are served; a second start reuses the
    catalog and index; an offline --share link fails with one clear line and the app keeps running."""
    port = free_port()
    env = user_env(outside, port)
    process, client = start_app([], env, port)
    try:
        search_each_kind(client, f"http://127.0.0.1:{port}/")
        cache = outside / ".cache" / "clip4cir"
        assert (cache / "fiq-demo-seed0" / "manifest.json").is_file()
        index_dirs = list((cache / "indexes").iterdir())
        assert len(index_dirs) == 1
        assert http_status(f"http://127.0.0.1:{port}/gradio_api/file={cache / 'fiq-demo-seed0' / 'manifest.json'}") \
            == 403
    finally:
        stop(process)
    process, client = start_app(["--share"], env, port)
    try:
        items, _ = client.predict("a red shirt", "shirt", 3, api_name="/text_search")
        assert len(items) == 3 and list((cache / "indexes").iterdir()) == index_dirs
    finally:
        output = stop(process)
    assert "could not create a Gradio share link" in output and "Traceback" not in output


def test_app_serves_a_data_folder_outside_the_working_and_temp_folders(outside, tiny_root):
    data = outside / "shop"
    shutil.copytree(tiny_root, data)
    port = free_port()
    process, client = start_app(["--data", str(data), "--clip-checkpoint", "demo/encoder.safetensors",
                                 "--combiner", "demo/combiner.safetensors"], user_env(outside, port), port)
    try:
        search_each_kind(client, f"http://127.0.0.1:{port}/")
        assert http_status(f"http://127.0.0.1:{port}/gradio_api/file={data / 'captions' / 'cap.dress.val.json'}") \
            == 403
    finally:
        stop(process)
