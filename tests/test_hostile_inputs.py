"""The second round of hostile inputs (issue 39): nothing of the user's is deleted or replaced on the strength of a
name, request bodies, captions and image decoding are bounded, the JSON API is strictly typed, and every bad input
is one line naming the value, without echoing it whole or showing a server path."""
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from clip4cir.commands.app import main as app_main
from clip4cir.commands.build_index import main as build_main
from clip4cir.commands.evaluate import main as evaluate_main
from clip4cir.core.artifacts import OWNER_MARK, clean_temporaries, make_temporary_folder, write_folder
from clip4cir.core.errors import ArtifactError, BusyError, DataError, ModelError
from clip4cir.core.ports import free_port
from clip4cir.data.images import PixelBudget, decode_image, load_image
from clip4cir.data.sources import open_source
from clip4cir.models.encoder_file import load_encoder, save_encoder
from clip4cir.models.factory import create_model, load_model
from clip4cir.retrieval.building import BuildOptions, build_index
from clip4cir.retrieval.catalog import catalog_items
from clip4cir.retrieval.search import MAX_CAPTION_CHARS, SearchEngine
from clip4cir.serving.http_api import MAX_BODY_BYTES, MAX_JSON_BYTES
from clip4cir.serving.ui import serve


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("encoder") / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), path)
    return path


def build(data, encoder_file, output, *extra):
    return build_main(["--data", str(data), "--clip-checkpoint", str(encoder_file), "--output", str(output),
                       "--quiet", "--workers", "0", *extra])


# ---- nothing is deleted on the strength of its name -----------------------------------------------------------
def test_build_index_never_deletes_a_users_folder_named_like_its_encoding(tiny_root, encoder_file, tmp_path):
    mine = tmp_path / ".index.encoding"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "plan.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"\.index\.encoding exists and was not made by this tool"):
        build(tiny_root, encoder_file, tmp_path / "index")
    assert (mine / "notes" / "plan.txt").read_text() == "mine" and not (tmp_path / "index").exists()


def test_build_index_never_writes_through_a_planted_link(tiny_root, encoder_file, tmp_path):
    target = tmp_path / "victim"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    (tmp_path / ".index.encoding").symlink_to(target, target_is_directory=True)
    with pytest.raises(ArtifactError, match="a link not made by this tool"):
        build(tiny_root, encoder_file, tmp_path / "index")
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "index").exists()  # refused before any work: no index committed


def test_build_index_clears_only_its_own_encodings(tiny_root, encoder_file, tmp_path):
    root = tmp_path / ".index.encoding"
    root.mkdir()
    (root / OWNER_MARK).write_text(json.dumps({"written_by": "clip4cir", "role": "encoding"}))
    stale = root / "0123abcd"  # an earlier build's chunks for another encoder: the tool's, removed
    stale.mkdir()
    (stale / OWNER_MARK).write_text(json.dumps({"written_by": "clip4cir", "role": "encoding"}))
    (stale / "chunk-000000.pt").write_bytes(b"x")
    users = root / "4567cdef"  # marked, but a user's file inside: kept
    users.mkdir()
    (users / OWNER_MARK).write_text(json.dumps({"written_by": "clip4cir", "role": "encoding"}))
    (users / "diary.txt").write_text("mine")
    assert build(tiny_root, encoder_file, tmp_path / "index") == 0
    assert not stale.exists() and (users / "diary.txt").read_text() == "mine"


def test_cleanup_trusts_the_mark_not_the_name(tmp_path):
    dead = 2 ** 22 + 4321  # no such process
    lookalike = tmp_path / f".step-000000099.tmp-{dead}-x"
    lookalike.mkdir()
    (lookalike / "notes.txt").write_text("mine")
    linked = tmp_path / f".step-000000098.tmp-{dead}-y"
    linked.symlink_to(lookalike, target_is_directory=True)
    ours = make_temporary_folder(tmp_path / "step-000000097")
    ours.rename(tmp_path / f".step-000000097.tmp-{dead}-z")  # as a killed process would have left it
    assert clean_temporaries(tmp_path) == 1
    assert (lookalike / "notes.txt").read_text() == "mine" and linked.is_symlink()
    assert not (tmp_path / f".step-000000097.tmp-{dead}-z").exists()
    write_folder(tmp_path / "step-000000099", "test.format", lambda tmp: (tmp / "a.txt").write_text("a"))
    assert (lookalike / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "step-000000099" / OWNER_MARK).exists()  # the mark is not part of the artifact


# ---- outputs: replaced only while unchanged, never onto an input ------------------------------------------------
def test_evaluate_replaces_its_output_only_while_unchanged(tiny_root, encoder_file, tmp_path):
    args = ["--data", str(tiny_root), "--clip-checkpoint", str(encoder_file), "--quiet", "--workers", "0"]
    metrics, dump = tmp_path / "metrics.json", tmp_path / "queries.jsonl"
    assert evaluate_main(args + ["--json", str(metrics), "--dump", str(dump)]) == 0
    assert evaluate_main(args + ["--json", str(metrics), "--dump", str(dump)]) == 0  # unchanged: replaced
    edited = {**json.loads(metrics.read_text()), "my_note": "keep"}
    metrics.write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="--json .*was changed since"):
        evaluate_main(args + ["--json", str(metrics)])
    assert json.loads(metrics.read_text())["my_note"] == "keep"
    with open(dump, "a") as f:
        f.write('{"reference": "mine", "captions": [], "top10": []}\n')
    kept = dump.read_text()
    with pytest.raises(ArtifactError, match="--dump .*was changed since"):
        evaluate_main(args + ["--dump", str(dump)])
    assert dump.read_text() == kept


def test_evaluate_refuses_two_outputs_in_one_file_and_an_output_onto_its_input(tiny_root, encoder_file, tmp_path):
    args = ["--data", str(tiny_root), "--clip-checkpoint", str(encoder_file), "--quiet", "--workers", "0"]
    both = tmp_path / "out.json"
    with pytest.raises(ArtifactError, match="--dump and --json name the same file"):
        evaluate_main(args + ["--json", str(both), "--dump", str(both)])
    before = encoder_file.read_bytes()
    with pytest.raises(ArtifactError, match="--json .* is also the --clip-checkpoint this run reads"):
        evaluate_main(args + ["--json", str(encoder_file), "--overwrite"])
    assert encoder_file.read_bytes() == before


# ---- bad inputs: one line naming the value ----------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--data", ""], ["--data", "  "]])
def test_an_empty_data_path_is_not_the_current_folder(argv, encoder_file, tmp_path):
    with pytest.raises(DataError, match="--data is empty"):
        build_main(argv + ["--clip-checkpoint", str(encoder_file), "--output", str(tmp_path / "i"), "--quiet"])
    with pytest.raises(DataError, match="--data is empty"):
        evaluate_main(argv + ["--clip-checkpoint", str(encoder_file), "--quiet"])


def test_a_checkpoint_that_is_not_a_file_says_what_it_is(tmp_path):
    with pytest.raises(ModelError, match="is a folder; give the file"):
        load_model(checkpoint=str(tmp_path))
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="is not a regular file"):
        load_model(checkpoint=str(fifo))


def test_a_checkpoint_whose_config_is_absurd_is_one_line_not_an_allocation(encoder_file, tmp_path):
    with safe_open(str(encoder_file), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["model_config"])
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "model_config": json.dumps({**config, "embed_dim": 10 ** 9})})
    with pytest.raises(ModelError, match=r"model_config does not match the weights: .* 1000000000"):
        load_encoder(bad)
    save_file(tensors, str(bad), metadata={**meta, "model_config": "{not json"})
    with pytest.raises(ModelError, match=rf"{bad}: metadata field 'model_config' is not valid JSON"):
        load_encoder(bad)


def test_a_csv_without_a_caption_column_says_so(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "t.csv").write_text("reference,target,text\na.jpg,a.jpg,red\n")
    with pytest.raises(DataError, match="the CSV header has no 'caption' column"):
        open_source(tmp_path / "t.csv", "triplets")


def test_special_files_in_an_image_folder_are_named_for_what_they_are(tmp_path):
    (tmp_path / "dress").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "dress" / "a.jpg")
    os.mkfifo(tmp_path / "dress" / "b.jpg")
    (tmp_path / "dress" / "c.jpg").symlink_to("/dev/null")
    (tmp_path / "dress" / "d.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.warns(UserWarning) as warned:
        open_source(tmp_path)
    text = " ".join(str(w.message) for w in warned)
    assert "b.jpg (a FIFO: not an image file)" in text
    assert "c.jpg (a device, through a link: not an image file)" in text
    assert "d.jpg (a link to nothing)" in text


def test_a_huge_jpeg_is_decoded_smaller_not_refused(tmp_path):
    data = io.BytesIO()
    Image.new("RGB", (20000, 20000), (200, 30, 30)).save(data, "JPEG", quality=30)  # 400 megapixels
    image = decode_image(data.getvalue(), "huge.jpg")
    assert max(image.size) <= 4096 and image.getpixel((5, 5))[0] > 150


ORIENTED = {1: lambda im: im, 2: lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
            3: lambda im: im.transpose(Image.ROTATE_180), 4: lambda im: im.transpose(Image.FLIP_TOP_BOTTOM),
            5: lambda im: im.transpose(Image.TRANSPOSE), 6: lambda im: im.transpose(Image.ROTATE_90),
            7: lambda im: im.transpose(Image.TRANSVERSE), 8: lambda im: im.transpose(Image.ROTATE_270)}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_a_photo_stored_sideways_is_read_upright(orientation, tmp_path):
    """A phone stores the sensor's pixels and says in EXIF how to turn them: every reader gets them turned."""
    upright = Image.new("RGB", (40, 24), (255, 255, 255))
    upright.paste((255, 0, 0), (0, 0, 10, 8))  # a red block top left
    stored = ORIENTED[orientation](upright)  # what the camera wrote, given the tag that undoes it
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif)
    image = load_image(path)
    assert image.size == (40, 24)
    assert image.getpixel((3, 3))[0] > 200 and image.getpixel((3, 3))[1] < 80, "the red block is top left"
    assert image.getpixel((36, 20))[1] > 200, "bottom right stays white"


def test_the_decode_budget_bounds_pixels_in_flight():
    budget = PixelBudget(100)
    peak, lock, held = [0], threading.Lock(), [0]

    def decode(pixels):
        with budget.hold(pixels, timeout=10):
            with lock:
                held[0] += pixels
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= pixels

    threads = [threading.Thread(target=decode, args=(60,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 60 and budget.used == 0  # two 60-pixel decodes never ran at once
    with budget.hold(100):
        with pytest.raises(BusyError, match="try again"):
            with budget.hold(1, timeout=0.05):
                pass


# ---- the served JSON API ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-api")
    for i, name in enumerate(["plain", "new\nline"] + [f"other{j}" for j in range(10)]):
        (root / "catalog" / "dress").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 60), (200, 20 * i, 30)).save(root / "catalog" / "dress" / f"{name}.jpg")
    encoder = create_model("cir-tiny")
    source = open_source(root / "catalog")
    index, _ = build_index(encoder, source, catalog_items(source), root / "index", BuildOptions(progress=False))
    port = free_port()
    ui = serve(SearchEngine(index, encoder), root / "cache", port=port, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    ui.close()


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url + "api/search", data=body,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.parametrize("k", ["NaN", "Infinity", "-Infinity", "1e400", '"5"', "true", "2.0"])
def test_k_is_a_whole_number_or_a_422(served, k):
    status, body = post(served, f'{{"kind": "text", "caption": "red", "k": {k}}}'.encode())
    assert status == 422 and "k" in body["detail"], body


def test_unknown_fields_are_refused(served):
    status, body = post(served, json.dumps({"kind": "text", "caption": "red", "limit": 3}).encode())
    assert status == 422 and "limit" in body["detail"]


def test_a_body_without_an_image_is_bounded(served):
    caption = "red " * (MAX_JSON_BYTES // 4)
    status, body = post(served, json.dumps({"kind": "text", "caption": caption}).encode())
    assert status == 413 and "without an image" in body["detail"]


def test_a_streamed_body_is_read_only_up_to_its_limit(served):
    sent = [0]

    def chunks():
        block = b" " * 2 ** 20
        while sent[0] < MAX_BODY_BYTES * 4:
            sent[0] += len(block)
            yield block

    request = urllib.request.Request(served + "api/search", data=chunks(), method="POST",
                                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    with pytest.raises((urllib.error.HTTPError, ConnectionError, urllib.error.URLError)) as caught:
        urllib.request.urlopen(request, timeout=60)
    if isinstance(caught.value, urllib.error.HTTPError):
        assert caught.value.code == 413


def test_a_long_caption_is_cut_before_tokenizing_with_a_note(served):
    status, body = post(served, json.dumps({"kind": "text", "caption": "red,dress," * 6000, "k": 2}).encode())
    assert status == 200 and body["notes"] == ["the caption has 60,000 characters; only its first 77 tokens were used"]
    assert MAX_CAPTION_CHARS < 60_000


def test_an_unknown_id_is_not_echoed_whole(served):
    status, body = post(served, json.dumps({"kind": "image", "reference_id": "x" * 50_000}).encode())
    assert status == 404 and len(body["detail"]) < 300 and "50,000 characters" in body["detail"]


def test_a_file_name_with_a_newline_has_a_working_link(served):
    status, body = post(served, json.dumps({"kind": "image", "reference_id": "dress/plain", "k": 11}).encode())
    assert status == 200
    linked = [hit for hit in body["results"] if "\n" in hit["id"]]
    assert linked, body
    for key in ("image_url", "thumbnail_url"):
        with urllib.request.urlopen(linked[0][key], timeout=30) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"


def test_a_large_png_upload_is_answered_and_decoded_small(served):
    data = io.BytesIO()
    Image.new("RGB", (7000, 7000), (180, 180, 240)).save(data, "PNG")
    import base64
    status, body = post(served, json.dumps({"kind": "image", "image_base64": base64.b64encode(
        data.getvalue()).decode(), "k": 2}).encode())
    assert status == 200 and len(body["results"]) == 2


# ---- the app's start ------------------------------------------------------------------------------------------
def test_a_bad_port_variable_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("CLIP4CIR_PORT", "abc")
    with pytest.raises(SystemExit) as stopped:
        app_main([])
    assert stopped.value.code == 2 and "CLIP4CIR_PORT: expected a whole number, got 'abc'" in capsys.readouterr().err


def test_a_port_in_use_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app_main(["--port", str(port), "--host", "127.0.0.1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve on port {port} of 127.0.0.1: it is in use" in err and "Traceback" not in err
