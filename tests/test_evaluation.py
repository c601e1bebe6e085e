import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip4cir.commands.evaluate import main as evaluate_main
from clip4cir.core.errors import DataError, ModelError
from clip4cir.data.sources import open_source
from clip4cir.data.sources.fashioniq import load_image_split, load_triplets
from clip4cir.evaluation.category_choice import ranks_within
from clip4cir.evaluation.image_search import image_retrieval_metrics
from clip4cir.evaluation.ranking import recall_at_k, target_ranks, top_k


def brute_force_ranks(queries, gallery, targets):
    """Reference: a stable descending sort of every score row (ties keep gallery order)."""
    scores = queries.numpy() @ gallery.numpy().T
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.array([int(np.where(order[i] == t)[0][0]) for i, t in enumerate(targets.tolist())])


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_ranks_match_brute_force_with_ties(chunk_size):
    g = torch.Generator().manual_seed(0)
    # float64, so that only the exact duplicates below tie (float32 sums differ between numpy and torch)
    gallery = F.normalize(torch.randn(60, 16, generator=g, dtype=torch.float64), dim=-1)
    gallery[10:20] = gallery[5]  # exact duplicates: tied scores
    gallery[40:45] = gallery[30]
    queries = F.normalize(torch.randn(33, 16, generator=g, dtype=torch.float64), dim=-1)
    queries[:5] = gallery[5]
    targets = torch.randint(0, 60, (33,), generator=g)
    targets[:3] = torch.tensor([5, 12, 19])
    targets[3:5] = torch.tensor([30, 44])
    ranks = target_ranks(queries, gallery, targets, chunk_size=chunk_size)
    np.testing.assert_array_equal(ranks.numpy(), brute_force_ranks(queries, gallery, targets))
    expected = {f"R@{k}": 100 * float(np.mean(brute_force_ranks(queries, gallery, targets) < k)) for k in (10, 50)}
    assert recall_at_k(ranks) == pytest.approx(expected)


def test_hand_computed_example():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # query 0 scores 1, 0, .6, .8 -> target 3 ranks second; query 1 -> target 2 (.8) second after 1;
    # query 2 -> target 1 (score 0) last
    ranks = target_ranks(queries, gallery, torch.tensor([3, 2, 1]))
    assert ranks.tolist() == [1, 1, 3]
    assert recall_at_k(ranks, ks=(1, 2, 4)) == pytest.approx({"R@1": 0.0, "R@2": 200 / 3, "R@4": 100.0})
    scores, indices = top_k(queries, gallery, 2, chunk_size=2)
    assert indices.tolist() == [[0, 3], [1, 2], [0, 3]]


def brute_force_image_metrics(features, labels, ks):
    f = F.normalize(features, dim=-1).numpy()
    lab = labels.numpy().astype(bool)
    n = len(f)
    out = {f"{m}@{k}": 0.0 for k in ks for m in ("mAP", "P")}
    for q in range(n):
        s = f @ f[q]
        s[q] = -np.inf
        order = np.argsort(-s, kind="stable")[: n - 1]
        rel = np.array([(lab[q] & lab[j]).any() for j in order], dtype=float)
        n_rel = sum((lab[q] & lab[j]).any() for j in range(n) if j != q)
        for k in ks:
            kk = min(k, n - 1)
            prec = np.cumsum(rel[:kk]) / np.arange(1, kk + 1)
            out[f"mAP@{k}"] += (prec * rel[:kk]).sum() / max(min(kk, n_rel), 1)
            out[f"P@{k}"] += rel[:kk].sum() / k
    return {k: 100 * v / n for k, v in out.items()}


def test_image_metrics_match_brute_force():
    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(50, 3, dtype=torch.bool)
    labels[torch.arange(50), torch.randint(0, 3, (50,), generator=g)] = True
    labels[:5, 1] = True  # some items have two categories, like shirt/toptee
    features = torch.randn(50, 8, generator=g) + 2.0 * labels.float() @ torch.randn(3, 8, generator=g)
    metrics = image_retrieval_metrics(features, labels, ks=(5, 10, 100), chunk_size=7)
    expected = brute_force_image_metrics(features, labels, (5, 10, 100))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-4), key
    assert metrics["query_ms"] >= 0


def test_evaluate_command_json_and_dump(tiny_root, tmp_path):
    out, dump = tmp_path / "out.json", tmp_path / "dump.jsonl"
    assert evaluate_main(["--data", str(tiny_root), "--model", "cir-tiny", "--json", str(out), "--dump", str(dump),
                          "--quiet", "--workers", "0"]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) >= {"dress", "shirt", "toptee", "average", "model", "combiner", "seconds"}
    assert metrics["average"]["R@10"] == pytest.approx(
        np.mean([metrics[c]["R@10"] for c in ("dress", "shirt", "toptee")]))
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(records) == sum(len(load_triplets(tiny_root, c, "val")) for c in ("dress", "shirt", "toptee"))
    r = records[0]
    assert len(r["top10"]) == 10 and 1 <= r["target_rank"] <= len(load_image_split(tiny_root, r["category"], "val"))
    assert (r["target_rank"] <= 10) == (r["target"] in r["top10"])
    # the dump's ranks give the same recall as the JSON
    dress = [x for x in records if x["category"] == "dress"]
    assert metrics["dress"]["R@10"] == pytest.approx(100 * np.mean([x["target_rank"] <= 10 for x in dress]))


def test_test_split_export(tiny_root, tmp_path):
    predictions = tmp_path / "pred"
    assert evaluate_main(["--data", str(tiny_root), "--model", "cir-tiny", "--split", "test", "--categories",
                          "dress", "--predictions", str(predictions), "--quiet", "--workers", "0"]) == 0
    exported = json.loads((predictions / "predictions.json").read_text())["dress"]
    gallery = set(load_image_split(tiny_root, "dress", "test"))
    assert len(exported) == len(load_triplets(tiny_root, "dress", "test"))
    assert all(len(e["top50"]) == min(50, len(gallery)) and set(e["top50"]) <= gallery for e in exported)


def test_image_task(tiny_root, tmp_path):
    assert evaluate_main(["--data", str(tiny_root), "--model", "cir-tiny", "--task", "image", "--quiet",
                          "--workers", "0", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= metrics["mAP@10"] <= 100
    assert metrics["images"] == sum(len(load_image_split(tiny_root, c, "val")) for c in ("dress", "shirt", "toptee"))


def test_bad_inputs(tiny_root, tmp_path):
    base = ["--data", str(tiny_root), "--model", "cir-tiny", "--quiet", "--workers", "0"]
    with pytest.raises(ModelError, match="missing.safetensors"):
        evaluate_main(["--data", str(tiny_root), "--clip-checkpoint", str(tmp_path / "missing.safetensors")])
    with pytest.raises(ModelError, match="nothing.pt"):
        evaluate_main(base + ["--combiner", str(tmp_path / "nothing.pt")])
    with pytest.raises(DataError, match="'skirt'"):
        evaluate_main(base + ["--categories", "skirt"])
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    triplets = json.loads((root / "captions" / "cap.shirt.val.json").read_text())
    split = [i for i in json.loads((root / "image_splits" / "split.shirt.val.json").read_text())
             if i != triplets[0]["target"]]
    (root / "image_splits" / "split.shirt.val.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match=f"cap.shirt.val.json: entry 0: target '{triplets[0]['target']}' is not in "
                                        f"image_splits/split.shirt.val.json"):
        evaluate_main(["--data", str(root), "--model", "cir-tiny", "--categories", "shirt", "--quiet",
                       "--workers", "0"])


def test_command_line_exit_code(tiny_root, tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    result = subprocess.run([sys.executable, "-m", "clip4cir", "evaluate", "--data", str(tmp_path / "none"), "--model",
                             "cir-tiny"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2 and "error:" in result.stderr and "none" in result.stderr
    assert "Traceback" not in result.stderr


def test_ablation_table_in_the_papers_layout(tiny_root, tmp_path, capsys):
    from clip4cir.models.combiner import Combiner, save_combiner
    from clip4cir.models.encoder_file import load_encoder, save_encoder
    from clip4cir.models.factory import create_model
    for name, seed in (("image", 1), ("both", 2)):
        save_encoder(create_model("cir-tiny", seed=seed), tmp_path / f"{name}.safetensors")
    both = load_encoder(tmp_path / "both.safetensors")
    save_combiner(Combiner(both.dim), tmp_path / "comb-both.safetensors", both.record())
    assert evaluate_main(["--data", str(tiny_root), "--model", "cir-tiny", "--table", "--quiet", "--workers", "0",
                          "--table-checkpoints", f"image={tmp_path}/image.safetensors,both={tmp_path}/both.safetensors,"
                          f"text={tmp_path}/missing.safetensors",
                          "--table-combiners", f"both={tmp_path}/comb-both.safetensors"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    columns = [f" {c} R@{k} " for c in ("Shirt", "Dress", "Toptee", "Average") for k in (10, 50)]
    assert lines[0].split("|")[3:11] == columns
    rows = [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in lines[2:]]
    assert rows == [("none", "Sum"), ("image", "Sum"), ("both", "Sum"), ("both", "Combiner")]
    assert "missing.safetensors for 'text' does not exist" in out and "no Combiner checkpoint for 'image'" in out
    # the Sum row of "both" is what evaluating that checkpoint alone reports
    evaluate_main(["--data", str(tiny_root), "--clip-checkpoint", str(tmp_path / "both.safetensors"), "--quiet",
                   "--workers", "0", "--json", str(tmp_path / "both.json")])
    average = json.loads((tmp_path / "both.json").read_text())["average"]
    assert lines[4].split("|")[-3].strip() == f"{average['R@10']:.2f}"
    with pytest.raises(ValueError, match="ENCODER=PATH"):
        evaluate_main(["--data", str(tiny_root), "--model", "cir-tiny", "--table", "--table-checkpoints", "all=x"])


def test_category_task_scores_the_probe_on_held_out_images(tiny_root, tmp_path):
    """The probe is trained on train-split images and scored on val ones: the demo's fine-tuned encoder separates
    the categories better than chance (1/3), a random encoder does not."""
    accuracy = {}
    demo = Path(__file__).resolve().parents[1] / "demo" / "encoder.safetensors"
    for name, encoder in (("random", ["--model", "cir-tiny"]), ("demo", ["--clip-checkpoint", str(demo)])):
        out = tmp_path / f"{name}.json"
        assert evaluate_main(["--data", str(tiny_root), "--task", "category", "--quiet", "--workers", "0",
                              "--json", str(out)] + encoder) == 0
        metrics = json.loads(out.read_text())
        assert metrics["images"] == 72 and metrics["train_images"] == 90
        accuracy[name] = metrics["accuracy"]
        composed = metrics["composed"]
        assert composed["queries"] == len(json.loads((tiny_root / "captions" / "cap.dress.val.json").read_text())) * 3
        assert composed["reference"]["right_category"] == composed["all"]["right_category"] == 100.0  # FashionIQ
    assert accuracy["random"] < 100 / 3 + 5 < 45 < accuracy["demo"]


def test_ranks_within_a_chosen_category_match_brute_force():
    """Each query ranks its target among its chosen category's items only (all for None), the reference left
    out; a target outside the chosen category is a miss."""
    generator = torch.Generator().manual_seed(3)
    queries, gallery = torch.randn(40, 8, generator=generator), torch.randn(30, 8, generator=generator)
    cats = [["a"] if j % 3 == 0 else ["b"] if j % 3 == 1 else ["a", "b"] for j in range(30)]
    targets = torch.randint(0, 30, (40,), generator=generator).tolist()
    exclude = torch.randint(0, 30, (40,), generator=generator).tolist()
    chosen = [[None, "a", "b"][i % 3] for i in range(40)]
    ranks = ranks_within(queries, gallery, targets, exclude, cats, chosen)
    scores = (queries @ gallery.T).numpy()
    for i in range(40):
        allowed = [j for j in range(30) if (chosen[i] is None or chosen[i] in cats[j])
                   and (j != exclude[i] or j == targets[i])]
        if targets[i] not in allowed:
            assert ranks[i] == 30
            continue
        order = sorted(allowed, key=lambda j: (-scores[i, j], j))
        assert ranks[i] == order.index(targets[i])
    assert (ranks == 30).any() and (ranks < 30).any()


def test_test_split_without_predictions_is_refused_before_loading_models(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="--predictions"):  # not the missing checkpoint: nothing was loaded
        evaluate_main(["--data", str(tiny_root), "--split", "test", "--clip-checkpoint", str(tmp_path / "none.pt")])


def test_non_finite_features_are_an_error_not_a_recall(tiny_root, tmp_path):
    from clip4cir.core.errors import NonFiniteError
    from clip4cir.models.encoder_file import save_encoder
    from clip4cir.models.factory import create_model
    broken = create_model("cir-tiny")
    with torch.no_grad():
        broken.model.visual.proj.fill_(float("nan"))  # what a diverged run leaves
    save_encoder(broken, tmp_path / "broken.safetensors")
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        evaluate_main(["--data", str(tiny_root), "--clip-checkpoint", str(tmp_path / "broken.safetensors"),
                       "--quiet", "--workers", "0", "--json", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


def test_empty_caption_queries_are_kept_and_counted(tiny_root, tmp_path):
    from clip4cir.evaluation.composed import rank_split
    from clip4cir.models.factory import create_model
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    path = root / "captions" / "cap.dress.val.json"
    entries = json.loads(path.read_text())
    entries[3]["captions"][1] = " . "
    path.write_text(json.dumps(entries))
    with pytest.warns(UserWarning, match="1 of 8 dress val queries have an empty caption"):
        ranking = rank_split(create_model("cir-tiny"), open_source(root), "val", "dress", progress=False)
    assert len(ranking.ranks) == len(entries)  # the denominator of the published protocol


def test_gallery_cache_follows_the_data(tiny_root, tmp_path):
    from PIL import Image

    from clip4cir.models.factory import create_model
    from clip4cir.models.features import gallery_features
    encoder = create_model("cir-tiny")
    cache = tmp_path / "cache"
    ids, first = gallery_features(encoder, open_source(tiny_root), "val", "dress", cache, progress=False)
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    Image.new("RGB", (72, 100), (0, 255, 0)).save(root / "images" / f"{ids[0]}.jpg")
    _, changed = gallery_features(encoder, open_source(root), "val", "dress", cache, progress=False)
    assert not torch.allclose(changed[0], first[0]) and torch.allclose(changed[1:], first[1:], atol=1e-5)
    for file in cache.iterdir():
        file.write_bytes(b"\x80garbage")  # corrupt every cache file
    with pytest.warns(UserWarning, match="cannot be read"):
        _, again = gallery_features(encoder, open_source(tiny_root), "val", "dress", cache, progress=False)
    torch.testing.assert_close(again, first)


def test_output_files_are_checked_before_any_work(tiny_root, tmp_path):
    from clip4cir.core.errors import Clip4CirError
    for flag in ("--json", "--dump"):  # a missing checkpoint would fail later: nothing was loaded
        with pytest.raises(Clip4CirError, match=f"{flag} .*the folder .*missing does not exist"):
            evaluate_main(["--data", str(tiny_root), "--clip-checkpoint", str(tmp_path / "none.pt"),
                           flag, str(tmp_path / "missing" / "out.json")])
