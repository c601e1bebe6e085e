"""CIRCO: its real annotation files read as they are, mAP@K as its authors define it (against a brute-force
reference on hand-made cases), a synthetic set in its layout evaluated end to end, and the test server's file."""
import json
from pathlib import Path

import pytest
from helpers import shared_annotations

from clip4cir.commands.evaluate import main as evaluate_main
from clip4cir.data.sources import open_source
from clip4cir.data.sources.circo import circo_queries
from clip4cir.data.synthetic import make_synthetic_circo
from clip4cir.evaluation.ranking import average_precision_at_k, map_at_k
from clip4cir.models.encoder_file import save_encoder
from clip4cir.models.factory import create_model


def brute_force_ap(found, truths, k):
    """AP@K written out: precision at every rank within K, kept where the rank holds a ground truth."""
    precisions = [sum(f in truths for f in found[:rank]) / rank for rank in range(1, min(k, len(found)) + 1)]
    kept = [p for rank, p in enumerate(precisions, 1) if found[rank - 1] in truths]
    return sum(kept) / min(k, len(truths))


def test_average_precision_on_hand_made_cases():
    assert average_precision_at_k(["a", "b", "c"], {"a", "b"}, 5) == 1.0
    assert average_precision_at_k(["x", "a", "y", "b"], {"a", "b"}, 5) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert average_precision_at_k(["x", "y", "a"], {"a", "b", "c", "d", "e", "f"}, 5) == pytest.approx((1 / 3) / 5)
    assert average_precision_at_k(["x", "y"], {"a"}, 5) == 0.0
    found = [["q", "a", "b", "r", "c", "s"], ["a", "t", "u", "v", "w", "b"], ["z"] * 6]
    truths = [{"a", "b", "c"}, {"a", "b"}, {"a"}]
    for k in (1, 2, 5, 10):
        expected = 100 * sum(brute_force_ap(f, t, k) for f, t in zip(found, truths, strict=True)) / 3
        assert map_at_k(found, truths, [k])[f"mAP@{k}"] == pytest.approx(expected)


@pytest.fixture(scope="session")
def real_circo() -> Path:
    return shared_annotations("circo", "CIRCO_ANNOTATIONS", "annotations/val.json")


def test_the_real_annotations_read_as_published(real_circo):
    val = circo_queries(real_circo / "annotations" / "val.json", with_truth=True)
    test = circo_queries(real_circo / "annotations" / "test.json", with_truth=False)
    assert len(val) == 220 and len(test) == 800
    assert all(t.target == t.ground_truths[0] for t in val)
    assert sum(len(t.ground_truths) for t in val) / len(val) == pytest.approx(4.16, abs=0.05)
    assert all(t.target is None and not t.ground_truths for t in test)
    assert {"cardinality", "addition", "negation"} <= {a for t in val for a in t.aspects}
    example = json.loads((real_circo / "submission_examples" / "submission_val.json").read_text())
    assert set(example) == {t.pair_id for t in val} and all(len(v) == 50 for v in example.values())


def test_a_synthetic_circo_set_is_evaluated_with_map_and_the_test_file_is_written(tmp_path):
    root = tmp_path / "circo"
    counts = make_synthetic_circo(root, "tiny", seed=0, workers=1)
    assert counts["ground_truths_per_val_query"] > 1.5  # several ground truths, as in CIRCO
    source = open_source(root)
    assert source.kind == "circo" and len(source.gallery("val")) == counts["images"]
    val = source.triplets("val")
    assert all(t.target in t.ground_truths and t.reference in source.gallery("val") for t in val)
    save_encoder(create_model("cir-tiny"), tmp_path / "enc.safetensors")
    common = ["--data", str(root), "--clip-checkpoint", str(tmp_path / "enc.safetensors"), "--quiet",
              "--workers", "0"]
    assert evaluate_main(common + ["--json", str(tmp_path / "val.json")]) == 0
    metrics = json.loads((tmp_path / "val.json").read_text())
    assert {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@10", "mAP@10 compare_change"} <= set(metrics["average"])
    assert metrics["score"] == metrics["average"]["mAP@10"] and 0 <= metrics["score"] <= 100
    assert evaluate_main(common + ["--split", "test", "--predictions", str(tmp_path / "submission")]) == 0
    submission = json.loads((tmp_path / "submission" / "circo_test_submission.json").read_text())
    assert set(submission) == {t.pair_id for t in source.triplets("test")} == {str(i) for i in range(counts["test"])}
    assert all(len(ids) == len(set(ids)) == 50 and all(isinstance(i, int) for i in ids)  # COCO ids, as published
               and {str(i) for i in ids} <= set(source.gallery("test"))
               for ids in submission.values())
