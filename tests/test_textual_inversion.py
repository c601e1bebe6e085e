"""Zero-shot composed retrieval by textual inversion: keyword masking, each method's loss falls and its φ inverts
held-out images better than before training, the φ file is bound to its encoder, and evaluate composes with it."""
import json
import socket
import urllib.request

import pytest
import torch

from clip4cir.commands.common import run
from clip4cir.commands.evaluate import main as evaluate_main
from clip4cir.commands.train_phi import main as train_phi
from clip4cir.core.errors import ModelError, SearchError
from clip4cir.data.datasets import GalleryDataset
from clip4cir.data.sources import open_source
from clip4cir.evaluation.composed import rankings_of
from clip4cir.evaluation.ranking import recall_at_k
from clip4cir.models.encoder_file import save_encoder
from clip4cir.models.factory import create_model, load_model
from clip4cir.models.feature_sum import combine_sum
from clip4cir.models.features import extract_image_features
from clip4cir.models.pseudo_tokens import Phi, PseudoTokenQueries, load_phi, save_phi, token_width, zero_shot_queries
from clip4cir.retrieval.building import BuildOptions, build_index
from clip4cir.retrieval.catalog import catalog_items
from clip4cir.retrieval.search import SearchEngine
from clip4cir.serving.demo import DEMO_DIR
from clip4cir.serving.ui import App, serve
from clip4cir.training.checkpointing import read_metrics
from clip4cir.training.textual_inversion import METHODS, inversion_recall, mask_keywords

BASE = ["--quiet", "--workers", "0", "--device", "cpu"]


def test_keyword_phrases_are_masked_between_function_words():
    assert mask_keywords("Red striped mini dress with long sleeves") == "$ with $"
    assert mask_keywords("Grey solid shirt with a round neck and short sleeves") == "$ with a $ and $"
    assert mask_keywords("with the and") == "a photo of $"  # no content word: the plain prompt


@pytest.fixture(scope="module")
def encoder_file():
    """The shipped pretrained base: users start from a pretrained CLIP (a random init's text features carry nothing
    for φ to invert)."""
    return DEMO_DIR / "base" / "encoder.safetensors"


@pytest.mark.parametrize("method", METHODS.names())
def test_each_method_learns_and_inverts_held_out_images_better(method, tiny_root, encoder_file, tmp_path):
    data = tiny_root / "pairs.jsonl"
    out = tmp_path / "run"
    assert train_phi(["--data", str(data), "--method", method, "--clip-checkpoint", str(encoder_file),
                      "--epochs", "8", "--batch-size", "32", "--lr", "1e-3", "--output", str(out),
                      "--sum-weight", "2.5", "--save-best"] + BASE) == 0
    log = read_metrics(out / "metrics.jsonl")
    assert log[-1]["loss"] < log[0]["loss"]
    encoder = load_model(checkpoint=str(encoder_file))
    phi, record = load_phi(out / "best.safetensors", encoder)
    assert record["method"] == method and record["template"] == "a photo of $ that {caption}"
    assert record["sum_weight"] == 2.5  # what the queries are made with, as the command was told
    source = open_source(data)
    val = extract_image_features(encoder, GalleryDataset(source, "val", transform=encoder.transform), progress=False)[1]
    before = inversion_recall(Phi(encoder.dim, token_width(encoder)), encoder, val)
    after = inversion_recall(phi, encoder, val)
    assert after["inversion R@5"] > before["inversion R@5"] + 5, (before, after)
    # evaluated as composed retrieval on a data set with triplets, with the same encoder only
    metrics = tmp_path / "composed.json"
    assert evaluate_main(["--data", str(tiny_root), "--clip-checkpoint", str(encoder_file), "--phi",
                          str(out / "best.safetensors"), "--json", str(metrics)] + BASE[:3]) == 0
    result = json.loads(metrics.read_text())
    assert result["phi"] and 0 <= result["average"]["R@10"] <= 100 and result["phi_sum_weight"] == 2.5
    alone = tmp_path / "alone.json"  # the file's weight overridden: φ's queries alone rank otherwise
    assert evaluate_main(["--data", str(tiny_root), "--clip-checkpoint", str(encoder_file), "--phi",
                          str(out / "best.safetensors"), "--sum-weight", "0", "--json", str(alone)] + BASE[:3]) == 0
    alone = json.loads(alone.read_text())
    assert alone["phi_sum_weight"] == 0 and alone["average"] != result["average"]
    # its queries (+ Sum, the file's weight) put more targets first than the Sum does (R@10 is 100 on so tiny a case)
    triplets = open_source(tiny_root)
    first = {name: recall_at_k(torch.cat([r.ranks for r in rankings_of(encoder, triplets, "val", combine,
                                                                       progress=False)]), (1,))["R@1"]
             for name, combine in (("sum", combine_sum), ("phi", zero_shot_queries(out / "best.safetensors", encoder)))}
    assert first["phi"] > first["sum"], first
    other = tmp_path / "other.safetensors"
    save_encoder(create_model("cir-tiny", seed=1), other)
    with pytest.raises(ModelError, match="was trained for encoder"):
        load_phi(out / "best.safetensors", load_model(checkpoint=str(other)))


def test_a_phi_run_made_before_the_sum_weight_existed_resumes_with_phi_alone(tiny_root, encoder_file, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    args = ["--data", str(tiny_root / "pairs.jsonl"), "--clip-checkpoint", str(encoder_file), "--batch-size", "32",
            "--output", str(out)] + BASE
    assert train_phi(args + ["--epochs", "1"]) == 0
    params = json.loads((out / "params.json").read_text())
    del params["sum_weight"]  # what an older version wrote: its queries were φ's alone
    (out / "params.json").write_text(json.dumps(params))
    assert run(train_phi, args + ["--epochs", "2", "--resume"]) == 2
    assert "--sum-weight was 0.0, now 1.5" in capsys.readouterr().err
    assert train_phi(args + ["--epochs", "2", "--resume", "--sum-weight", "0"]) == 0
    newest = sorted((out / "checkpoints").iterdir())[-1] / "model.safetensors"
    assert load_phi(newest)[1]["sum_weight"] == 0


def test_evaluate_weighs_the_sum_only_in_phis_queries(tiny_root, encoder_file, capsys):
    assert run(evaluate_main, ["--data", str(tiny_root), "--clip-checkpoint", str(encoder_file), "--sum-weight",
                               "1"] + BASE[:3]) == 2
    assert "--sum-weight weighs the Sum in φ's queries: it needs --phi (the mode is sum)" in capsys.readouterr().err


def test_lincir_needs_texts_and_says_so(tiny_root, encoder_file, tmp_path, capsys):
    assert run(train_phi, ["--data", str(tiny_root), "--method", "lincir", "--clip-checkpoint", str(encoder_file),
                           "--output", str(tmp_path / "run")] + BASE) == 2
    assert "has no training texts" in capsys.readouterr().err


def test_the_search_engine_answers_zero_shot_composed_queries(tiny_root, encoder_file, tmp_path):
    encoder = load_model(checkpoint=str(encoder_file))
    source = open_source(tiny_root)
    build_index(encoder, source, catalog_items(source, ["val"]), tmp_path / "index", BuildOptions(progress=False))
    phi = Phi(encoder.dim, token_width(encoder), hidden=64)
    save_phi(phi, tmp_path / "phi.safetensors", "pic2word", "a photo of $ that {caption}", encoder.record())
    plain = SearchEngine.load(tmp_path / "index", device="cpu")
    with pytest.raises(SearchError, match="no φ is loaded"):
        plain.composed_search("is red", reference_id=plain.index.ids(1)[0], mode="phi")
    engine = SearchEngine.load(tmp_path / "index", device="cpu", phi_path=str(tmp_path / "phi.safetensors"))
    reference = engine.index.ids(1)[0]
    found = engine.composed_search("Is red", reference_id=reference, k=5, category="all", mode="phi")
    assert len(found.hits) == 5 and reference not in [h.id for h in found.hits]
    query = PseudoTokenQueries(phi, encoder)(torch.from_numpy(engine.index.feature(reference))[None], ["is red"])[0]
    expected = engine.index.top_items(query.numpy(), 6, None)
    assert [h.id for h in found.hits] == [item.id for item, _ in expected if item.id != reference][:5]

    # the app offers the mode, and the JSON endpoint answers it like the engine
    assert ("Zero-shot (no triplets)", "phi") in App(engine, None).choices.modes and \
        all(v != "phi" for _, v in App(plain, None).choices.modes)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = serve(engine, tmp_path / "cache", port=port, quiet=True)
    try:
        body = json.dumps({"kind": "composed", "caption": "Is red", "reference_id": reference, "k": 5, "mode": "phi",
                           "category": "all"})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/search", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    finally:
        ui.close()
    assert [r["id"] for r in answer["results"]] == [h.id for h in found.hits]
