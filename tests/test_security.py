"""What a hostile client or a careless command line cannot do: read server files through the API, run script
through the catalog's file route, make a tool delete or overwrite what it did not write, resume a run with
another objective, or pass numbers that cannot be right."""
import json
import os
import shutil
import time
import urllib.error
import urllib.request

import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from clip4cir.commands.build_index import main as build_main
from clip4cir.commands.evaluate import main as evaluate_main
from clip4cir.commands.train_clip import main as train_main
from clip4cir.commands.train_combiner import main as combiner_main
from clip4cir.core.artifacts import OWNER_MARK, write_folder
from clip4cir.core.errors import ArtifactError, CatalogIndexError, DataError, ModelError
from clip4cir.core.ports import free_port
from clip4cir.data.images import load_image
from clip4cir.data.sources import open_source
from clip4cir.models.combiner import Combiner
from clip4cir.models.encoder_file import save_encoder
from clip4cir.models.factory import create_model, load_model
from clip4cir.retrieval.building import BuildOptions, build_index
from clip4cir.retrieval.catalog import catalog_items
from clip4cir.retrieval.search import SearchEngine
from clip4cir.serving.ui import serve
from clip4cir.serving.uploads import NOT_AN_UPLOAD

BASE = ["--model", "cir-tiny", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--quiet"]


def fetch(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def call(url: str, api_name: str, data: list, timeout: float = 30) -> tuple[str, str]:
    """Call a Gradio API endpoint over plain HTTP; (the last event's name, its data)."""
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(request, timeout=timeout).read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=timeout) as response:
        lines = response.read().decode().splitlines()
    events = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    payloads = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    return events[-1], payloads[-1]


def draw(path, colour=(200, 30, 30), size=(60, 90)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture(scope="module")
def hostile_catalog(tmp_path_factory):
    """An image folder whose category folders also hold a script page, a scripted SVG and a private CSV; one
    category is a symlinked folder and one image a symlinked file."""
    from helpers import outside_folder
    root = outside_folder("clip4cir-hostile-")
    catalog = root / "catalog"
    for i in range(6):
        draw(catalog / "dress" / f"d{i}.jpg", (200, 30 * i, 30))
        draw(root / "elsewhere" / f"s{i}.png", (30, 30 * i, 200))
    (catalog / "shirt").symlink_to(root / "elsewhere", target_is_directory=True)
    draw(root / "single.jpg", (10, 200, 10))
    (catalog / "dress" / "linked.jpg").symlink_to(root / "single.jpg")
    (catalog / "dress" / "notes.html").write_text("<script>alert(document.cookie)</script>")
    (catalog / "dress" / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)'
                                                '</script></svg>')
    (catalog / "dress" / "private.csv").write_text("secret,1\n")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def served(hostile_catalog):
    encoder = create_model("cir-tiny")
    source = open_source(hostile_catalog / "catalog")
    index, unreadable = build_index(encoder, source, catalog_items(source), hostile_catalog / "index",
                                    BuildOptions(progress=False))
    assert not unreadable
    engine = SearchEngine(index, encoder, Combiner(encoder.dim))
    port = free_port()
    ui = serve(engine, hostile_catalog / "cache", port=port, quiet=True)
    yield engine, f"http://127.0.0.1:{port}/"
    ui.close()


def test_symlinked_category_folders_and_files_are_indexed(served):
    engine, _ = served
    assert len(engine.index) == 13  # 6 dresses, the linked one, and the 6 images of the linked shirt folder
    assert set(engine.index.categories()) == {"dress", "shirt"}
    assert "dress/linked" in engine.index and "shirt/s0" in engine.index


def test_the_api_reads_only_uploaded_files(served, hostile_catalog, tmp_path):
    engine, url = served
    private = hostile_catalog / "private-photo.jpg"
    draw(private)
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    answers = set()
    for path in (str(private), str(hostile_catalog / "missing.jpg"), "/proc/self/environ", str(fifo)):
        for value in (path, {"path": path}, {"path": path, "meta": {"_type": "gradio.FileData"}}):
            started = time.perf_counter()
            event, data = call(url, "image_search", [value, None, "all", 3])
            assert event == "error", (value, data)
            assert time.perf_counter() - started < 20  # the FIFO never hangs a worker
            answers.add(data)
            assert "No such file" not in data and "not an image" not in data
    assert any("uploaded to this app" in a for a in answers)
    assert len({a for a in answers if "uploaded to this app" in a}) == 1  # one message: existence is not revealed
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="uploaded to this app"):
        client.predict(caption="is red", image=str(private), api_name="/composed_search")
    found = client.predict(image=handle_file(str(private)), k=3, api_name="/image_search")  # a real upload works
    assert len(found["results"]) == 3


def test_the_ui_events_read_only_uploaded_files(served, hostile_catalog):
    engine, _ = served
    from clip4cir.serving.uploads import read_upload
    for value in (str(hostile_catalog / "single.jpg"), {"path": str(hostile_catalog / "single.jpg"),
                                                        "meta": {"_type": "gradio.FileData"}}):
        with pytest.raises(Exception, match="uploaded to this app"):
            read_upload(value)
    assert NOT_AN_UPLOAD.startswith("the image must be a file uploaded")


def test_special_files_are_never_read_as_images(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    started = time.perf_counter()
    with pytest.raises(DataError, match="not a regular file"):
        load_image(fifo)
    assert time.perf_counter() - started < 5
    with pytest.raises(DataError, match="not a regular file"):
        load_image("/dev/zero")


def test_the_file_routes_serve_only_indexed_images(served, hostile_catalog):
    engine, url = served
    dress = hostile_catalog / "catalog" / "dress"
    for name in ("notes.html", "logo.svg", "private.csv", "d0.jpg"):  # Gradio's own route serves no catalog file
        assert fetch(f"{url}gradio_api/file={dress / name}")[0] == 403
    status, headers, body = fetch(f"{url}catalog/image/dress%2Fd0")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body == (dress / "d0.jpg").read_bytes()
    assert headers["x-content-type-options"] == "nosniff"
    status, headers, _ = fetch(f"{url}catalog/image/shirt%2Fs0")  # in a symlinked folder
    assert status == 200 and headers["content-type"] == "image/png"
    assert fetch(f"{url}catalog/image/dress%2Flinked")[0] == 200  # a symlinked file
    for name in ("dress%2Fnotes", "dress%2Flogo", "dress%2Fprivate", "..%2F..%2Fetc%2Fpasswd"):
        assert fetch(f"{url}catalog/image/{name}")[0] == 404
    status, headers, body = fetch(f"{url}catalog/thumbnail/dress%2Fd1")
    assert status == 200 and headers["content-type"] == "image/jpeg" and headers["x-content-type-options"] == "nosniff"
    client = Client(url, verbose=False)
    first = client.predict(reference_id="dress/d0", k=2, api_name="/image_search")["results"][0]
    assert fetch(first["image_url"])[0] == fetch(first["thumbnail_url"])[0] == 200


def test_api_arguments_are_type_checked(served):
    engine, url = served
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="caption must be a string, got int"):
        client.predict(caption=123, k=2, api_name="/text_search")
    with pytest.raises(Exception, match="reference_id must be a string"):
        client.predict(caption="is red", reference_id=7, k=2, api_name="/composed_search")
    with pytest.raises(Exception, match="k must be a whole number"):
        client.predict(caption="red", k="ten", api_name="/text_search")


# ---- nothing of the user's is replaced ------------------------------------------------------------------------
def small_index(tmp_path, tiny_root, output):
    encoder_file = tmp_path / "enc.safetensors"
    if not encoder_file.exists():
        save_encoder(create_model("cir-tiny"), encoder_file)
    return build_main(["--data", str(tiny_root), "--clip-checkpoint", str(encoder_file), "--output", str(output),
                       "--quiet", "--workers", "0"])


def test_a_rebuild_keeps_the_users_files_inside_the_old_index(tiny_root, tmp_path):
    index = tmp_path / "index"
    assert small_index(tmp_path, tiny_root, index) == 0
    (index / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="notes.txt"):
        small_index(tmp_path, tiny_root, index)
    assert (index / "notes.txt").read_text() == "mine" and (index / "manifest.json").is_file()
    (index / "notes.txt").unlink()
    assert small_index(tmp_path, tiny_root, index) == 0  # an index of the tool's files alone is replaced


def test_a_symlinked_output_is_written_through_and_nothing_is_left_behind(tiny_root, tmp_path):
    real = tmp_path / "real-index"
    assert small_index(tmp_path, tiny_root, real) == 0
    link = tmp_path / "index-link"
    link.symlink_to(real, target_is_directory=True)
    assert small_index(tmp_path, tiny_root, link) == 0
    assert link.is_symlink() and (real / "manifest.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    leftover = tmp_path / f".thing.tmp-{dead}-abcd1234"
    leftover.mkdir()
    (leftover / OWNER_MARK).write_text(json.dumps({"written_by": "clip4cir", "role": "temporary"}))
    (leftover / "big.bin").write_bytes(b"0" * 100)
    mine = tmp_path / f".thing.tmp-{os.getpid()}-abcd1234"  # this process's own: perhaps being written
    mine.mkdir()
    write_folder(tmp_path / "thing", "test.format", lambda tmp: (tmp / "a.txt").write_text("a"))
    assert not leftover.exists() and mine.exists()


def test_a_temporary_killed_while_being_marked_is_removed_and_a_user_folder_is_kept(tmp_path):
    dead = 2 ** 22 + 12346
    cut_short = tmp_path / f".thing.tmp-{dead}-00000001"  # killed between mkdir and the end of writing its mark
    cut_short.mkdir()
    (cut_short / OWNER_MARK).write_text("")
    empty = tmp_path / f".thing.tmp-{dead}-00000002"  # killed right after mkdir
    empty.mkdir()
    users = tmp_path / f".thing.tmp-{dead}-00000003"  # a user's folder under such a name: not this tool's
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    write_folder(tmp_path / "thing", "test.format", lambda tmp: (tmp / "a.txt").write_text("a"))
    assert not cut_short.exists() and not empty.exists()
    assert (users / "notes.txt").read_text() == "mine"


def test_a_refused_build_leaves_no_encoding_behind(tiny_root, tmp_path):
    encoder_file = tmp_path / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder_file)
    with pytest.raises(CatalogIndexError, match="--pq-m 7 must divide the features. dimension"):
        build_main(["--data", str(tiny_root), "--clip-checkpoint", str(encoder_file), "--output",
                    str(tmp_path / "index"), "--kind", "ivf-pq", "--pq-m", "7", "--quiet", "--workers", "0"])
    assert not list(tmp_path.glob(".index*"))
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    items = catalog_items(open_source(root), ["val"])
    for item in items[: len(items) // 2]:  # half the catalog unreadable: nlist no longer fits, after encoding
        open(item.path, "w").write("not an image")
    with pytest.raises(Exception, match="nlist"):
        build_main(["--data", str(root), "--clip-checkpoint", str(encoder_file), "--output", str(tmp_path / "index"),
                    "--kind", "ivf-sq8", "--nlist", str(len(items)), "--quiet", "--workers", "0"])
    assert not list(tmp_path.glob(".index*"))


@pytest.fixture(scope="module")
def evaluated_root(tiny_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    save_encoder(create_model("cir-tiny"), folder / "enc.safetensors")
    return folder


def test_evaluate_outputs_never_replace_a_users_file(tiny_root, evaluated_root, tmp_path):
    photo = tmp_path / "photo.jpg"
    draw(photo)
    before = photo.read_bytes()
    args = ["--data", str(tiny_root), "--clip-checkpoint", str(evaluated_root / "enc.safetensors"), "--quiet",
            "--workers", "0"]
    for flag in ("--json", "--dump"):
        with pytest.raises(ArtifactError, match=f"{flag} .*photo.jpg exists and is not a file this tool wrote"):
            evaluate_main(args + [flag, str(photo)])
        assert photo.read_bytes() == before
    metrics, dump = tmp_path / "metrics.json", tmp_path / "queries.jsonl"
    assert evaluate_main(args + ["--json", str(metrics), "--dump", str(dump)]) == 0
    assert evaluate_main(args + ["--json", str(metrics), "--dump", str(dump)]) == 0  # its own files: replaced
    assert json.loads(metrics.read_text())["written_by"] == "clip4cir evaluate"
    link = tmp_path / "link.json"
    link.symlink_to(photo)
    with pytest.raises(ArtifactError, match="not a file this tool wrote"):
        evaluate_main(args + ["--json", str(link)])
    assert evaluate_main(args + ["--json", str(photo), "--overwrite"]) == 0  # asked for
    assert "average" in json.loads(photo.read_text())


# ---- resume -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert train_main(["--data", str(tiny_root), "--output", str(out), "--max-steps", "1"] + BASE) == 0
    return out


@pytest.mark.parametrize("change, named", [
    (["--label-smoothing", "0.1"], "--label-smoothing"), (["--symmetric"], "--symmetric"),
    (["--hard-negatives"], "--hard-negatives"), (["--recipe", "plus"], "--recipe"),
    (["--learn-temperature"], "--learn-temperature"), (["--weight-decay", "0.1"], "--weight-decay"),
    (["--preprocess", "squarepad"], "--preprocess"), (["--encoder", "image"], "--encoder")])
def test_resume_refuses_a_changed_objective(stopped_run, tiny_root, change, named):
    with pytest.raises(DataError, match=f"{named} was"):
        train_main(["--data", str(tiny_root), "--output", str(stopped_run), "--resume"] + BASE + change)


def test_resume_may_change_the_length_and_the_saving(stopped_run, tiny_root, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    assert train_main(["--data", str(tiny_root), "--output", str(out), "--resume", "--epochs", "1", "--save-every",
                       "50"] + BASE) == 0


def test_resume_names_a_changed_training_image(tiny_root, tmp_path):
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    out = tmp_path / "run"
    assert train_main(["--data", str(root), "--output", str(out), "--max-steps", "1", "--epochs", "1"] + BASE) == 0
    from clip4cir.data.datasets import TripletDataset
    reference = TripletDataset(open_source(root), "train").triplets[0].reference
    image = root / "images" / f"{reference}.jpg"
    Image.open(image).convert("L").convert("RGB").save(image)
    with pytest.raises(DataError, match="training data changed.*an image file"):
        train_main(["--data", str(root), "--output", str(out), "--resume", "--epochs", "1"] + BASE)
    stage2 = tmp_path / "stage2"
    encoder = tmp_path / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder)
    args = ["--data", str(root), "--clip-checkpoint", str(encoder), "--output", str(stage2), "--batch-size", "8",
            "--workers", "0", "--quiet"]
    assert combiner_main(args + ["--max-steps", "1"]) == 0
    (root / "captions" / "cap.dress.train.json").write_text(
        json.dumps(json.loads((root / "captions" / "cap.dress.train.json").read_text())[:-1]))
    with pytest.raises(DataError, match=r"annotation file .*cap\.dress\.train\.json changed"):
        combiner_main(args + ["--resume"])
    with pytest.raises(DataError, match="--gallery-negatives was"):
        combiner_main(args[:-1] + ["--resume", "--gallery-negatives", "--quiet"])


# ---- numbers that cannot be right --------------------------------------------------------------------------------
@pytest.mark.parametrize("main, argv, flag", [
    ("build", ["--memory-budget", "inf"], "--memory-budget"), ("build", ["--memory-budget", "nan"], "--memory-budget"),
    ("build", ["--memory-budget", "-1"], "--memory-budget"), ("build", ["--memory-budget", "0"], "--memory-budget"),
    ("build", ["--pq-m", "0"], "--pq-m"), ("build", ["--workers", "-1"], "--workers"),
    ("build", ["--target-recall", "nan"], "--target-recall"), ("build", ["--seed", "-1"], "--seed"),
    ("build", ["--seed", str(2 ** 70)], "--seed"), ("build", ["--nlist", "0"], "--nlist"),
    ("train", ["--target-ratio", "nan"], "--target-ratio"), ("train", ["--target-ratio", "inf"], "--target-ratio"),
    ("train", ["--lr", "inf"], "--lr"), ("train", ["--workers", "-1"], "--workers"),
    ("train", ["--label-smoothing", "1"], "--label-smoothing"), ("train", ["--seed", "-1"], "--seed"),
    ("combiner", ["--proj-dim", "100000000"], "--proj-dim"), ("combiner", ["--hidden-dim", "0"], "--hidden-dim"),
    ("evaluate", ["--batch-size", "0"], "--batch-size"), ("evaluate", ["--workers", "-1"], "--workers")])
def test_every_bad_number_is_refused_naming_its_flag(main, argv, flag, tiny_root, tmp_path, capsys):
    mains = {"build": build_main, "train": train_main, "combiner": combiner_main, "evaluate": evaluate_main}
    base = {"build": ["--model", "cir-tiny", "--output", str(tmp_path / "index")],
            "train": ["--model", "cir-tiny", "--output", str(tmp_path / "run")],
            "combiner": ["--model", "cir-tiny", "--output", str(tmp_path / "run")],
            "evaluate": ["--model", "cir-tiny"]}[main]
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        mains[main](["--data", str(tiny_root)] + base + argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert time.perf_counter() - started < 5 and not list(tmp_path.iterdir())  # before any work


# ---- checked before work, said when it cannot be checked ---------------------------------------------------------
def test_a_truncated_validation_image_stops_the_run_before_training(tiny_root, tmp_path):
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    val_only = json.loads((root / "image_splits" / "split.toptee.val.json").read_text())[-1]
    image = root / "images" / f"{val_only}.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{val_only}.jpg is truncated"):
        train_main(["--data", str(root), "--output", str(tmp_path / "out")] + BASE)
    assert not (tmp_path / "out").exists()


def test_a_large_jpeg_is_decoded_smaller(tmp_path):
    huge = tmp_path / "huge.jpg"
    Image.new("RGB", (8000, 7000), (20, 120, 30)).save(huge, quality=40)  # 56 megapixels
    image = load_image(huge)
    assert image.width * image.height <= 50_000_000 and image.getpixel((10, 10))[1] > 100


def test_a_legacy_combiner_is_accepted_with_a_warning_and_a_mismatch_names_the_index(tiny_root, tmp_path, caplog):
    encoder_file = tmp_path / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder_file)
    assert build_main(["--data", str(tiny_root), "--clip-checkpoint", str(encoder_file), "--output",
                       str(tmp_path / "index"), "--quiet", "--workers", "0"]) == 0
    encoder = load_model(checkpoint=str(encoder_file))
    torch.save({"epoch": 1, "Combiner": Combiner(encoder.dim).state_dict()}, tmp_path / "combiner.pt")
    with caplog.at_level("WARNING"):
        SearchEngine.load(tmp_path / "index", combiner_path=str(tmp_path / "combiner.pt"))
    assert "does not record the encoder it was trained on" in caplog.text
    from clip4cir.models.combiner import save_combiner
    other = create_model("cir-tiny", seed=3)
    save_combiner(Combiner(other.dim), tmp_path / "other.safetensors", other.record())
    with pytest.raises(ModelError, match="index .*index"):
        SearchEngine.load(tmp_path / "index", combiner_path=str(tmp_path / "other.safetensors"))


def test_skipped_images_are_reported_with_their_reason(tiny_root, tmp_path, capsys):
    folder = tmp_path / "folder"
    draw(folder / "a" / "good.jpg")
    draw(folder / "a" / "good2.jpg")
    (folder / "a" / "bad.jpg").write_text("not an image")
    encoder_file = tmp_path / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder_file)
    assert build_main(["--data", str(folder), "--clip-checkpoint", str(encoder_file), "--output",
                       str(tmp_path / "index"), "--quiet", "--workers", "0"]) == 0
    assert "bad.jpg is not an image file that can be read" in capsys.readouterr().out
