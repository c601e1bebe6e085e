"""clip-retrieval's own clients against our server, unchanged: its Python ``ClipClient`` and its web front end, from
the clip-retrieval package on PyPI installed into a virtual environment of its own (its pins, numpy<2 and
open-clip-torch<3, are not ours: only the package's files are installed, with requests for the client). The
client's module is run from the installed package's file; the front end's built files are served as they are,
pointed at our server with ``?back=`` as its users do."""
import functools
import http.server
import json
import subprocess
import sys
import threading
import urllib.parse
import urllib.request

import pytest
from helpers import outside_folder

pytestmark = pytest.mark.slow
VERSION = "2.45.0"
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def package():
    """(the venv's python, its site-packages) with clip-retrieval's files installed."""
    folder = outside_folder("clip4cir-clip-retrieval-")
    subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True)
    python = folder / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"clip-retrieval=={VERSION}",
                    "requests", "urllib3", "idna", "certifi", "charset-normalizer"], check=True, timeout=600)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    yield python, site
    subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.fixture(scope="module")
def demo(served_demo):
    return served_demo


CLIENT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("clip_client", sys.argv[1] + "/clip_retrieval/clip_client.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
client = module.ClipClient(url=sys.argv[2] + "/knn-service", indice_name="clip4cir", num_images=10,
                           deduplicate=False, use_safety_model=True, use_violence_detector=True)
query = json.loads(sys.argv[3])
print(json.dumps({"text": client.query(text=query["text"]), "image": client.query(image=query["image"]),
                  "embedding": client.query(embedding_input=query["embedding"])}))
"""


def test_clip_client_gets_what_our_api_gives(package, demo):
    python, site = package
    engine, base = demo
    item = engine.index.item(engine.index.ids(1)[0])
    query = {"text": "a red striped dress", "image": item.path, "embedding": engine.index.feature(item.id).tolist()}
    done = subprocess.run([str(python), "-c", CLIENT, site, base, json.dumps(query)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["id"] for r in answers["text"]] == [h.id for h in engine.text_search(query["text"], 10, "all").hits]
    assert [r["id"] for r in answers["image"]] == [h.id for h in engine.image_search(item.path, 10, "all").hits]
    assert answers["image"][0]["id"] == item.id and answers["embedding"][0]["id"] == item.id
    assert all({"id", "similarity", "url", "caption"} <= set(r) for r in answers["text"])


def test_its_front_end_shows_our_results(package, demo, tmp_path):
    from playwright.sync_api import sync_playwright
    _, site = package
    engine, base = demo
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=f"{site}/front/build")
    handler.log_message = lambda *args: None
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    query = urllib.parse.urlencode({"back": base, "index": "clip4cir", "query": "a red striped dress"})
    sent = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/knn-service") else None)
            page.goto(f"http://127.0.0.1:{front.server_port}/?{query}")
            page.wait_for_function(f"""() => {{
                const walk = (root) => [...root.querySelectorAll('*')].flatMap(
                    e => [e, ...(e.shadowRoot ? walk(e.shadowRoot) : [])]);
                return walk(document).filter(e => e.tagName === 'IMG' && e.src.startsWith({json.dumps(base)})
                                               && e.complete && e.naturalWidth > 0).length >= 5; }}""",
                                   timeout=120_000)
            shown = page.evaluate(f"""() => {{
                const walk = (root) => [...root.querySelectorAll('*')].flatMap(
                    e => [e, ...(e.shadowRoot ? walk(e.shadowRoot) : [])]);
                return walk(document).filter(e => e.tagName === 'IMG' && e.src.startsWith({json.dumps(base)}))
                    .map(e => e.src); }}""")
            page.screenshot(path=str(tmp_path / "front.png"))  # looked at: our items, with their titles
            browser.close()
    finally:
        front.shutdown()
    request = json.loads(sent[-1])  # what the front end asked: the same again, from here
    assert request["text"] == "a red striped dress" and request["indice_name"] == "clip4cir"
    with urllib.request.urlopen(urllib.request.Request(base + "/knn-service", sent[-1].encode()), timeout=60) as r:
        expected = [record["id"] for record in json.loads(r.read())]
    assert expected[0] == engine.text_search("a red striped dress", 1, "all").hits[0].id
    shown_ids = [urllib.parse.unquote(src.rsplit("/", 1)[-1]) for src in shown]
    assert shown_ids == expected[:len(shown_ids)] and len(shown_ids) >= 5, (shown_ids, expected)
