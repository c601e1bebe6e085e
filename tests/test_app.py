import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import axe_playwright_python
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from helpers import REPO, user_env  # noqa: E402

from clip4cir.core.ports import free_port  # noqa: E402
from clip4cir.data.sources import open_source  # noqa: E402
from clip4cir.models.combiner import Combiner  # noqa: E402
from clip4cir.models.encoder_file import save_encoder  # noqa: E402
from clip4cir.models.factory import create_model, load_model  # noqa: E402
from clip4cir.retrieval.building import BuildOptions, build_index  # noqa: E402
from clip4cir.retrieval.catalog import catalog_items  # noqa: E402
from clip4cir.retrieval.search import SearchEngine  # noqa: E402
from clip4cir.serving.service import thumbnails_for  # noqa: E402
from clip4cir.serving.ui import App, plain, serve  # noqa: E402

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"



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
                           BuildOptions(progress=False))
    engine = SearchEngine(index, encoder, Combiner(encoder.dim))
    port = free_port()
    ui = serve(engine, outside_catalog.parent / "cache", port=port, quiet=True)
    yield engine, f"http://127.0.0.1:{port}/"
    ui.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False)


def test_one_endpoint_per_action_with_named_parameters(served, client, outside_catalog):
    engine, url = served
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) == {"/composed_search", "/image_search", "/text_search"}
    parameters = {p["parameter_name"]: p["parameter_has_default"] for p in endpoints["/composed_search"]["parameters"]}
    assert parameters == {"caption": False, "image": True, "reference_id": True, "category": True, "k": True,
                          "mode": True}
    triplet = json.loads((outside_catalog / "captions" / "cap.shirt.val.json").read_text())[0]
    path = engine.index.item(triplet["candidate"]).path
    found = client.predict(caption="is blue", image=handle_file(path), category="shirt", k=5, mode="sum",
                           api_name="/composed_search")
    expected = engine.composed_search("is blue", image=path, k=5, category="shirt", mode="sum")
    assert [r["id"] for r in found["results"]] == [h.id for h in expected.hits]
    assert [r["rank"] for r in found["results"]] == [1, 2, 3, 4, 5]
    assert all(r["categories"] == ["shirt"] for r in found["results"]) and found["category"] == "shirt"
    # by default within the reference's category, as the page and the JSON API search; "all" searches everything
    by_id = client.predict(caption="is blue", reference_id=triplet["candidate"], k=50, api_name="/composed_search")
    shirts = [i for i in engine.index.ids(len(engine.index)) if "shirt" in engine.index.item(i).categories]
    assert by_id["category"] == "shirt" and len(by_id["results"]) == min(50, len(shirts) - 1)
    everywhere = client.predict(caption="is blue", reference_id=triplet["candidate"], category="all", k=50,
                                api_name="/composed_search")
    assert len(everywhere["results"]) == 50 and triplet["candidate"] not in [r["id"] for r in everywhere["results"]]
    similar = client.predict(reference_id=triplet["candidate"], k=3, api_name="/image_search")
    assert triplet["candidate"] not in [r["id"] for r in similar["results"]]  # more like this: itself left out
    uploaded = client.predict(image=handle_file(path), category="auto", k=3, api_name="/image_search")
    assert uploaded["results"][0]["id"] == triplet["candidate"] and "predicted category" in uploaded["notes"][0]
    text = client.predict(caption="a red dress", category="dress", k=4, api_name="/text_search")
    assert len(text["results"]) == 4 and all(r["categories"] == ["dress"] for r in text["results"])
    # results are data: thumbnails are fetched only when wanted, and they are small whole images
    first = found["results"][0]
    with urllib.request.urlopen(first["thumbnail_url"], timeout=30) as response:
        thumbnail = Image.open(response)
        thumbnail.load()
    original = Image.open(engine.index.item(first["id"]).path)
    assert max(thumbnail.size) <= 320
    assert abs(thumbnail.width / thumbnail.height - original.width / original.height) < 0.03  # not cropped
    assert http_status(first["image_url"]) == 200


def test_catalog_images_are_served_and_nothing_else(served, outside_catalog):
    engine, url = served
    assert not str(outside_catalog).startswith(("/tmp", str(REPO)))
    item = engine.index.item_at(0)
    assert http_status(f"{url}catalog/image/{item.id}") == 200  # by id, never by path
    assert http_status(f"{url}gradio_api/file={item.path}") == 403
    assert http_status(f"{url}gradio_api/file={outside_catalog / 'captions' / 'cap.dress.val.json'}") == 403
    assert http_status(f"{url}gradio_api/file={outside_catalog.parent / 'enc.safetensors'}") == 403
    assert http_status(f"{url}gradio_api/file=/etc/passwd") == 403


def test_bad_queries_are_errors_with_their_reason(served, client, tmp_path):
    engine, _ = served
    some = engine.index.item(engine.index.ids(1)[0]).path
    cases = [
        (dict(caption="", image=handle_file(some)), "caption is empty"),
        (dict(caption="is red"), "no reference"),
        (dict(caption="is red", reference_id="nope"), "'nope'"),
        (dict(caption="is red", reference_id=engine.index.ids(1)[0], k=2.5), "whole number"),
        (dict(caption="is red", reference_id=engine.index.ids(1)[0], k=0), "whole number"),
        (dict(caption="is red", reference_id=engine.index.ids(1)[0], k=10_001), "from 1 to"),
        (dict(caption="is red", reference_id=engine.index.ids(1)[0], category="hats"), "'hats'"),
    ]
    for arguments, reason in cases:
        with pytest.raises(Exception, match=reason):
            client.predict(**arguments, api_name="/composed_search")
    with pytest.raises(Exception, match="no reference"):
        client.predict(api_name="/image_search")
    long = client.predict(caption=" ".join(["very long caption words"] * 170), k=3, api_name="/text_search")
    assert len(long["results"]) == 3 and "tokens" in long["notes"][0]
    for mode in ("RGBA", "L", "CMYK", "P"):
        image = Image.new("RGB", (60, 90), (30, 60, 200)).convert(mode)
        path = tmp_path / f"q-{mode}.{'tiff' if mode == 'CMYK' else 'png'}"
        image.save(path)
        assert len(client.predict(image=handle_file(str(path)), k=2, api_name="/image_search")["results"]) == 2
    huge = tmp_path / "huge.jpg"
    Image.new("RGB", (8000, 6000), (200, 30, 30)).save(huge, quality=50)  # a JPEG is decoded at a reduced size
    assert len(client.predict(caption="is darker", image=handle_file(str(huge)), k=3, mode="sum",
                              api_name="/composed_search")["results"]) == 3
    too_many_pixels = tmp_path / "poster.png"
    Image.new("RGB", (8000, 8000), (200, 30, 30)).save(too_many_pixels)  # 64 megapixels, a small file
    with pytest.raises(Exception, match="poster.png has more than 50 megapixels"):
        client.predict(image=handle_file(str(too_many_pixels)), api_name="/image_search")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    with pytest.raises(Exception, match="notes.jpg is not an image file"):
        client.predict(image=handle_file(str(not_image)), api_name="/image_search")
    too_large = tmp_path / "large.png"
    too_large.write_bytes(os.urandom(21 * 2 ** 20))
    with pytest.raises(Exception, match="maximum file size"):
        client.predict(image=handle_file(str(too_large)), api_name="/image_search")
    assert len(client.predict(caption="red", k=2, api_name="/text_search")["results"]) == 2  # still up


def test_user_text_is_shown_as_typed_not_rendered(served, outside_catalog):
    engine, _ = served
    app = App(engine, thumbnails_for(engine.index, outside_catalog.parent / "cache"))
    app.build("about")
    info = app.ui.composed.panel.info
    shown = app.composed(None, "is red", "all", 2, "sum", "<img src=x onerror=alert(1)>", "", [])
    assert "<img" not in shown[info] and "&lt;img src=x onerror=alert(1)&gt;" in shown[info]
    shown = app.composed(None, "# big", "hats", 2, "sum", engine.index.ids(1)[0], "", [])
    assert "'hats'" in shown[info]
    assert plain("# big *bold* <b>") == "\\# big \\*bold\\* &lt;b&gt;"


def test_steps_sent_back_by_the_browser_are_checked(served, outside_catalog):
    """The steps come back from the browser's session storage, so they are anything: only steps that can be
    searched again are kept, and a photo only while it is one of this app's uploads."""
    engine, _ = served
    app = App(engine, thumbnails_for(engine.index, outside_catalog.parent / "cache"))
    app.build("about")
    item = engine.index.ids(1)[0]
    good = {"ref": item, "caption": "is red", "category": "all", "k": 5, "mode": "sum"}
    kept = app.checked_steps([good, {**good, "ref": "nope"}, {**good, "category": "hats"}, {**good, "k": "x"},
                            {**good, "mode": "eval"}, "junk", {**good, "caption": 3},
                            {**good, "ref": "", "image": {"path": "/etc/passwd",
                                                          "meta": {"_type": "gradio.FileData"}}}])
    assert kept[0] == {**good, "image": None} and kept[1]["k"] == 12 and len(kept) == 3
    assert app.checked_steps("not a list") == []
    shown = app.show_step(kept)  # the photo step: refused as not an upload, the page keeps working
    assert "must be a file uploaded" in shown[app.ui.composed.panel.info]
    back = app.step_back([good, {**good, "caption": "is blue"}])
    assert back[app.ui.composed.caption] == "is red" and back[app.ui.steps] == [{**good, "image": None}]
    assert back[app.ui.composed.panel.hits] == [h.id for h in engine.composed_search(
        "is red", reference_id=item, k=5, category="all", mode="sum").hits]


def test_about_names_the_encoder_file_not_its_path(served):
    engine, url = served
    config = json.dumps(json.loads(urllib.request.urlopen(f"{url}config", timeout=30).read()))
    assert "enc.safetensors" in config and str(engine.encoder.source["checkpoint"]) not in config


VIEWPORTS = {"wide": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Chromium is not installed at {CHROMIUM} "
                                    "(apt-get install -y chromium; .ci/run installs it)")


def open_page(browser, url: str, viewport: dict, ready: str = "#browse img"):
    page = browser.new_page(viewport=viewport)
    page.goto(url)
    page.wait_for_selector(ready, timeout=60_000)
    return page


def input_value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def wait_for_value(page, elem_id: str, test: str) -> None:
    """Wait until a text field exists and its value passes ``test`` (JavaScript, e.g. ``=== 'x'``)."""
    page.wait_for_function(f"(e => e !== null && e.value {test})(document.querySelector("
                           f"'#{elem_id} textarea, #{elem_id} input'))", timeout=60_000)


def in_view(page, selector: str) -> bool:
    """The element's top and bottom are both within the window."""
    return page.evaluate(f"""(() => {{ const r = document.querySelector({json.dumps(selector)})
        .getBoundingClientRect(); return r.top >= -2 && r.bottom <= window.innerHeight + 2; }})()""")


def result_ids(page, gallery: str) -> list[str]:
    """The ids shown in a results gallery, in rank order (each caption starts "RANK. ID")."""
    return page.evaluate(f"""Array.from(document.querySelectorAll('#{gallery} .caption-label'))
        .map(e => e.innerText.split("\\n")[0].split(" ")[1])""")


def results_check(page, gallery: str, viewport: dict, count: int | None = None,
                  scrolled: bool = True) -> list[str]:
    """Results come into view without the user scrolling (``scrolled``), their thumbnails keep the items'
    proportions, every caption (rank, id, title, categories, match level) is shown whole, the grid has no scroll
    box of its own, and a phone shows two a row. Returns the ids shown."""
    try:
        page.wait_for_selector(f"#{gallery} .grid-container img", timeout=30_000)
        if count:
            page.wait_for_function(f"document.querySelectorAll('#{gallery} .caption-label').length === {count}",
                                   timeout=30_000)
        if scrolled:
            page.wait_for_function(f"(t => t >= 0 && t < {viewport['height']})(document.querySelector("
                                   f"'#{gallery} .grid-container').getBoundingClientRect().top)", timeout=5_000)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / f"failed-{gallery}-{viewport['width']}.png"))
        raise
    shapes = page.evaluate(f"""Array.from(document.querySelectorAll('#{gallery} .grid-container img')).map(i => [
        i.naturalWidth / i.naturalHeight, getComputedStyle(i).objectFit, i.clientWidth / i.clientHeight])""")
    assert shapes and all(fit == "contain" or abs(natural - shown) < 0.02 for natural, fit, shown in shapes)
    captions = page.evaluate(f"""Array.from(document.querySelectorAll('#{gallery} .caption-label')).map(e => {{
        const r = e.getBoundingClientRect(), tile = e.closest('.thumbnail-item').getBoundingClientRect();
        return [e.innerText, e.scrollWidth <= e.clientWidth + 1 && e.scrollHeight <= e.clientHeight + 1,
                r.left >= tile.left - 1 && r.right <= tile.right + 1 && r.bottom <= tile.bottom + 1]; }})""")
    for rank, (text, whole, inside) in enumerate(captions, 1):
        assert whole and inside and text.startswith(f"{rank}. ") and re.search(r" · (strong|good|weak) match$", text), \
            (text, whole, inside)
    boxes = page.evaluate(f"""Array.from(document.querySelectorAll('#{gallery} *')).filter(e => {{
        const s = getComputedStyle(e); return ['auto', 'scroll'].includes(s.overflowY)
        && e.scrollHeight > e.clientHeight + 1; }}).map(e => e.className)""")
    assert not boxes, boxes  # the grid grows with the page
    if viewport["width"] < 500 and len(captions) > 2:
        tops = page.evaluate(f"""Array.from(document.querySelectorAll('#{gallery} .thumbnail-item')).slice(0, 3)
            .map(e => Math.round(e.getBoundingClientRect().top))""")
        assert tops[0] == tops[1] < tops[2], tops  # two a row
    return [text.split("\n")[0].split(" ")[1] for text, _, _ in captions]


@needs_chromium
@pytest.mark.parametrize("screen", list(VIEWPORTS))
def test_browser_example_search_refine_back_and_links(served, screen, tmp_path):
    from playwright.sync_api import sync_playwright
    engine, url = served
    viewport = VIEWPORTS[screen]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = open_page(browser, url, viewport)
        # the first screen: an annotated example, one click from its results, and what the score means
        wait_for_value(page, "caption", "!== ''")
        first_reference, first_caption = input_value(page, "reference-id"), input_value(page, "caption")
        assert first_caption in [c for c, _ in engine.index.captions[first_reference]]
        page.screenshot(path=str(ARTIFACTS / f"first-screen-{screen}.png"))
        assert in_view(page, "#composed-search") and page.locator(".score-help").first.is_visible()
        page.click("#composed-search")
        first_ids = results_check(page, "composed-results", viewport, 12)
        target = dict(engine.index.captions[first_reference])[first_caption]
        marked = page.locator("#composed-results .caption-label", has_text="★ target")
        assert marked.count() == (target in first_ids) and (not marked.count() or marked.first.is_visible())
        page.screenshot(path=str(ARTIFACTS / f"composed-{screen}.png"))
        assert f"ref={first_reference}" in page.url
        expected = [h.id for h in engine.composed_search(first_caption, reference_id=first_reference, k=36,
                                                         category="reference").hits]
        assert first_ids == expected[:12] and len(expected) > 12
        page.click("#composed-more")  # past the slider: up to 24 more
        assert results_check(page, "composed-results", viewport, len(expected), scrolled=False) == expected
        # a result becomes the next reference: it and the caption box in view, the caption focused
        clicked_id = first_ids[1]
        page.locator("#composed-results .grid-container button").nth(1).click()
        wait_for_value(page, "reference-id", f"=== '{clicked_id}'")
        page.wait_for_function("document.activeElement && document.activeElement.closest('#caption') !== null")
        assert in_view(page, "#reference") and in_view(page, "#caption"), page.evaluate(
            "['reference', 'caption'].map(i => document.getElementById(i).getBoundingClientRect().toJSON())")
        page.keyboard.type("is darker")
        page.keyboard.press("Enter")
        page.wait_for_function("window.location.search.includes('darker')")
        page.wait_for_function(f"!document.querySelector('#composed-results .grid-container').innerText.includes("
                               f"'{clicked_id}')")  # the new reference is left out of its results
        second_ids = results_check(page, "composed-results", viewport, 12)
        page.screenshot(path=str(ARTIFACTS / f"composed-refined-{screen}.png"))
        # the browser's Back and Forward reload the page at each address: the search and the steps up to it
        page.go_back()
        wait_for_value(page, "reference-id", f"=== '{first_reference}'")
        assert results_check(page, "composed-results", viewport, 12) == first_ids
        assert input_value(page, "caption") == first_caption and not page.locator("#back").is_enabled()
        page.go_forward()
        wait_for_value(page, "reference-id", f"=== '{clicked_id}'")
        assert results_check(page, "composed-results", viewport, 12) == second_ids
        assert first_reference in page.locator("#steps-trail").inner_text()  # the steps survived the reloads
        # the app's Back: the previous step's results at once, and its address
        page.click("#back")
        wait_for_value(page, "reference-id", f"=== '{first_reference}'")
        page.wait_for_function("!window.location.search.includes('darker')")
        assert results_check(page, "composed-results", viewport, 12) == first_ids
        assert input_value(page, "caption") == first_caption
        # more like the reference: the Find similar tab, with an address
        page.click("#similar")
        page.wait_for_function("window.location.search.includes('tab=image')")
        assert f"ref={first_reference}" in page.url
        similar_ids = results_check(page, "image-results", viewport)
        assert f"({first_reference})" in page.locator("#image-info").inner_text()
        # a photo instead of the id: the id is cleared, and the message says the photo was used
        photo = tmp_path / "photo.png"
        Image.open(engine.index.item(similar_ids[0]).path).save(photo)
        page.set_input_files("#query-image input[type=file]", str(photo))
        wait_for_value(page, "image-id", "=== ''")
        page.click("#image-search")
        page.wait_for_function("document.querySelector('#image-info').innerText.includes('your photo')")
        assert results_check(page, "image-results", viewport)[0] == similar_ids[0]
        page.get_by_role("tab", name="Describe it").click()
        page.fill("#text textarea", "a red dress")
        page.press("#text textarea", "Enter")
        results_check(page, "text-results", viewport)
        page.wait_for_function("window.location.search.includes('tab=text')")
        page.screenshot(path=str(ARTIFACTS / f"text-{screen}.png"))
        # a shared link of an image search opens at its results
        shared = browser.new_page(viewport=viewport)
        shared.goto(f"{url}?tab=image&ref={first_reference}&k=7")
        assert results_check(shared, "image-results", viewport, 7) == similar_ids[:7]
        browser.close()


@needs_chromium
@pytest.mark.parametrize("screen", list(VIEWPORTS))
def test_axe_finds_nothing_serious_and_every_stop_shows_focus(served, screen):
    """axe-core on the first screen and with results; every control labelled; Tab reaches the controls with a
    visible focus ring, and no download button is among them."""
    from playwright.sync_api import sync_playwright
    axe = Path(axe_playwright_python.__file__).parent / "axe.min.js"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = open_page(browser, served[1], VIEWPORTS[screen])
        for moment in ("first screen", "results"):
            if moment == "results":
                page.click("#composed-search")
                page.wait_for_selector("#composed-results .grid-container img")
            page.add_script_tag(path=str(axe))
            report = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
            bad = [(v["id"], v["help"], [n["target"] for n in v["nodes"][:3]]) for v in report["violations"]
                   if v["impact"] in ("serious", "critical")]
            assert not bad, (moment, bad)
        unlabelled = page.evaluate("""Array.from(document.querySelectorAll(
            'input:not([type=hidden]), textarea, select')).filter(e => e.offsetParent !== null
            && !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby'))
            .map(e => e.outerHTML.slice(0, 80))""")
        assert not unlabelled, unlabelled
        stops = []
        for _ in range(60):
            page.keyboard.press("Tab")
            stops.append(page.evaluate("""(() => { const e = document.activeElement, s = getComputedStyle(e);
                const ring = x => x && (getComputedStyle(x).outlineStyle !== 'none'
                    || getComputedStyle(x).boxShadow !== 'none');
                return {name: e.getAttribute('aria-label') || e.title || e.innerText.slice(0, 30), type: e.type,
                        within: (e.closest('[id]') || {}).id || '',
                        ring: ring(e) || ring(e.closest('.wrap')) || ring(e.parentElement)}; })()"""))
        ours = [s for s in stops if s["within"] not in ("", "root")]
        assert {"radio", "range"} <= {s["type"] for s in ours}  # the mode and the slider are reached
        assert all(s["ring"] for s in ours), [s for s in ours if not s["ring"]]
        assert not [s for s in stops if "download" in s["name"].lower()]
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




def search_each_kind(client: Client) -> None:
    """A search of each kind through the API, and a result's thumbnail and image fetched over HTTP as the
    browser fetches them."""
    text = client.predict(caption="a blue dress", category="dress", k=5, api_name="/text_search")
    assert len(text["results"]) == 5, text
    reference = text["results"][0]["id"]
    composed = client.predict(caption="is red", reference_id=reference, category="auto", k=5,
                              api_name="/composed_search")
    assert len(composed["results"]) == 5 and reference not in [r["id"] for r in composed["results"]]
    result = composed["results"][0]
    assert http_status(result["thumbnail_url"]) == http_status(result["image_url"]) == 200
    upload = client.predict(reference_id=reference, k=3, api_name="/image_search")
    assert len(upload["results"]) == 3


def test_a_new_machine_runs_the_readme_start_command(outside):
    """`python app.py` with no arguments, HOME a fresh folder outside the working and temp folders (as on a new
    machine or a Space): every kind of search works and result images are served from the shipped catalog and
    index (nothing is drawn or encoded at start); an offline --share link fails with one clear line and the app
    keeps running."""
    port = free_port()
    env = user_env(outside, port)
    process, client = start_app([], env, port)
    try:
        search_each_kind(client)
        cache = outside / ".cache" / "clip4cir"
        assert "indexes" not in {p.name for p in cache.iterdir()}  # the demo's own index, not one built here
        assert http_status(f"http://127.0.0.1:{port}/gradio_api/file={REPO / 'demo' / 'catalog' / 'manifest.json'}") \
            == 403
    finally:
        stop(process)
    process, client = start_app(["--share"], env, port)
    try:
        found = client.predict(caption="a red shirt", category="shirt", k=3, api_name="/text_search")
        assert len(found["results"]) == 3
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
        search_each_kind(client)
        assert http_status(f"http://127.0.0.1:{port}/gradio_api/file={data / 'captions' / 'cap.dress.val.json'}") \
            == 403
    finally:
        stop(process)
