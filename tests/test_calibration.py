"""An approximate index calibrated to a target recall keeps it for the queries users send: composed queries (with
the Combiner it serves), text queries and uploaded images, measured on queries calibration never saw, against
exact search computed here with NumPy."""
import numpy as np
import pytest
import torch

from clip4cir.data.captions import eval_caption
from clip4cir.data.sources import open_source
from clip4cir.data.synthetic import make_synthetic_fashioniq
from clip4cir.models.combiner import load_combiner
from clip4cir.models.encoder_file import load_encoder
from clip4cir.models.features import encode_texts
from clip4cir.retrieval.building import BuildOptions, build_index, serving_queries
from clip4cir.retrieval.catalog import catalog_items
from clip4cir.retrieval.tuning import calibration_half, describe_tuning
from clip4cir.serving.demo import DEMO_DIR


def recall_at_10(index, queries: np.ndarray) -> float:
    """The index's Recall@10 against exact top-10 by NumPy over its own full-precision vectors."""
    vectors = index.store.vectors(np.arange(len(index.store)))
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    found = index.search(queries, 10)[1]
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist(), strict=True)]))


@pytest.mark.slow
def test_the_target_recall_holds_for_composed_text_and_image_queries(tmp_path):
    root = tmp_path / "catalog"
    make_synthetic_fashioniq(root, "demo", seed=0)
    make_synthetic_fashioniq(tmp_path / "other", "tiny", seed=7)  # photos that are not in the catalog
    encoder = load_encoder(DEMO_DIR / "encoder.safetensors")
    combiner = load_combiner(DEMO_DIR / "combiner.safetensors", encoder=encoder)[0]
    source = open_source(root)
    items = catalog_items(source, ["train", "val", "test"])
    index, _ = build_index(encoder, source, items, tmp_path / "index",
                           BuildOptions(kind="ivf-sq8", target_recall=0.95, combine=combiner.combine, workers=0,
                                        progress=False))
    tuning = index.tuning
    assert set(tuning["queries"]) == {"image", "composed", "text"} and min(tuning["queries"].values()) >= 100
    assert "image" in describe_tuning(tuning) and "composed" in describe_tuning(tuning)
    assert min(tuning["recall"][""].values()) >= 0.95
    # measured on what calibration never used: the other half of the val triplets, and photos of another catalog
    held = [(t.reference, eval_caption(t.captions)) for t in source.triplets("val")
            if not calibration_half(t.reference, eval_caption(t.captions))]
    assert len(held) >= 150
    references = torch.from_numpy(np.stack([index.feature(r) for r, _ in held]))
    texts = encode_texts(encoder, [c for _, c in held])
    composed = combiner.combine(references, texts).numpy()
    others = open_source(tmp_path / "other")
    photos = torch.stack([encoder.transform(others.load_image(i)) for i in list(others.gallery("val"))[:150]])
    with torch.inference_mode():
        uploads = encoder.encode_image(photos).numpy()
    measured = {"composed": recall_at_10(index, composed), "text": recall_at_10(index, texts.numpy()),
                "image": recall_at_10(index, uploads)}
    assert min(measured.values()) >= 0.95, measured
    # the rule is stable: the same data gives the same settings
    again, _ = build_index(encoder, source, items, tmp_path / "again",
                           BuildOptions(kind="ivf-sq8", target_recall=0.95, combine=combiner.combine, workers=0,
                                        progress=False))
    assert again.tuning["effort"] == tuning["effort"] and again.tuning["k_factor"] == tuning["k_factor"]


def test_a_catalog_without_captions_gets_stand_in_queries(tmp_path):
    from PIL import Image

    from clip4cir.models.factory import create_model
    for category in ("bag", "shoe"):
        (tmp_path / "shop" / category).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 60), (40 * i, 100, 30)).save(tmp_path / "shop" / category / f"{i}.jpg")
    source = open_source(tmp_path / "shop")
    items = catalog_items(source)
    encoder = create_model("cir-tiny")
    features = np.random.default_rng(0).standard_normal((len(items), encoder.dim)).astype(np.float32)
    queries = serving_queries(encoder, source, items, features)
    assert set(queries) == {"composed", "text"} and len(queries["text"]) == 2 * 20
    assert np.allclose(np.linalg.norm(queries["composed"], axis=1), 1, atol=1e-5)
