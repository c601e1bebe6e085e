"""Image similarity learned from labels: the losses, miner and metrics against hand computations, the labelled
data and its bad inputs, training (resumable) that improves retrieval on held-out labels, and the fine-tuned
encoder serving image search."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import miners

from clip4cir.commands.build_index import main as build_main
from clip4cir.commands.evaluate import main as evaluate_main
from clip4cir.commands.train_labels import main as train_labels
from clip4cir.core.errors import DataError
from clip4cir.data.sources import open_source
from clip4cir.data.synthetic import make_synthetic_identities
from clip4cir.evaluation.labels import retrieval_metrics
from clip4cir.models.encoder_file import load_encoder
from clip4cir.retrieval.search import SearchEngine, SearchError
from clip4cir.training.checkpointing import RunDir, read_metrics
from clip4cir.training.metric_losses import LOSSES, labelled_loss, make_loss
from clip4cir.training.samplers import ClassBatchSampler

BASE = ["--batch-size", "16", "--m-per-class", "4", "--lr", "1e-3", "--workers", "0", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    folder = tmp_path_factory.mktemp("identities")
    make_synthetic_identities(folder, identities=40, views=6, seed=0, workers=1)
    return folder


def test_batch_hard_mining_picks_the_hardest_triplets_by_hand():
    g = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(12, 5, generator=g), dim=-1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    anchors, positives, negatives = miners.BatchHardMiner()(embeddings, labels)
    distances = torch.cdist(embeddings, embeddings)
    for a, p, n in zip(anchors.tolist(), positives.tolist(), negatives.tolist(), strict=True):
        same = (labels == labels[a]) & (torch.arange(12) != a)
        assert p == int(torch.where(same, distances[a], torch.tensor(-1.0)).argmax())  # farthest positive
        assert n == int(torch.where(labels != labels[a], distances[a], torch.tensor(9.0)).argmin())  # nearest negative
    loss, miner = make_loss("triplet", 4, 5)
    per_triplet = F.relu(distances[anchors, positives] - distances[anchors, negatives] + 0.1)
    expected = per_triplet[per_triplet > 0].mean()  # pytorch-metric-learning averages the non-zero losses
    torch.testing.assert_close(labelled_loss(loss, miner, embeddings, labels), expected, rtol=1e-4, atol=1e-5)


def brute_force(features, labels):
    """Recall@K, MAP@R and R-precision written out (each item queries all others)."""
    features = F.normalize(features, dim=-1).numpy()
    labels = labels.numpy()
    recall, average_precision, r_precision = {k: [] for k in (1, 2, 4, 8)}, [], []
    for q in range(len(features)):
        order = [j for j in np.argsort(-(features @ features[q]), kind="stable") if j != q]
        relevant = [labels[j] == labels[q] for j in order]
        r = sum(labels == labels[q]) - 1
        for k in recall:
            recall[k].append(any(relevant[:k]))
        hits = np.cumsum(relevant[:r])
        average_precision.append(sum(hits[i] / (i + 1) for i in range(r) if relevant[i]) / r)
        r_precision.append(sum(relevant[:r]) / r)
    return {**{f"R@{k}": 100 * np.mean(v) for k, v in recall.items()}, "MAP@R": 100 * np.mean(average_precision),
            "R-precision": 100 * np.mean(r_precision)}


def test_retrieval_metrics_match_a_brute_force_reference():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 6, (60,), generator=g)
    features = torch.randn(60, 8, generator=g) + 1.5 * F.one_hot(labels, 8).float()
    ours, expected = retrieval_metrics(features, labels), brute_force(features, labels)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-3), key


def test_the_sampler_gives_m_images_of_each_label_and_resumes():
    labels = [i // 5 for i in range(100)]  # 20 labels of 5 images
    sampler = ClassBatchSampler(labels, m=4, batch_size=16, seed=2)
    order = list(sampler)
    for start in range(0, len(order), 16):
        counts = np.bincount([labels[i] for i in order[start:start + 16]])
        assert set(counts[counts > 0]) == {4}
    assert list(ClassBatchSampler(labels, 4, 16, seed=2)) == order
    sampler.set_epoch(0, skip_batches=2)
    assert list(sampler) == order[32:]
    with pytest.raises(ValueError, match="multiple of --m-per-class"):
        ClassBatchSampler(labels, m=3, batch_size=16, seed=0)


def test_labelled_data_and_its_bad_inputs(identities, tmp_path):
    source = open_source(identities / "labels.csv")
    assert source.kind == "labels" and source.attribute_names[0] == "dark"
    train, test = set(source.labels("train").values()), set(source.labels("test").values())
    assert train and test and not train & test  # test labels are never seen in training
    closed = open_source(identities / "labels.csv", split_by="image")
    assert set(closed.labels("test").values()) <= set(closed.labels("train").values())
    folder = open_source(identities, "labels")
    assert len(folder.gallery("train")) == len(source.gallery("train"))
    rows = list(csv.reader(open(identities / "labels.csv")))
    cases = [([rows[0], rows[1][:2] + ["2"] + rows[1][3:]], "attribute 'dark' is '2'"),
             ([rows[0], ["nowhere.jpg", "x"] + rows[1][2:]], "line 2: image 'nowhere.jpg' is not"),
             ([["image", "name"], ["a", "b"]], "'image' and 'label'")]
    for content, message in cases:
        with open(tmp_path / "bad.csv", "w", newline="") as f:
            csv.writer(f).writerows(content)
        with pytest.raises(DataError, match=message):
            open_source(tmp_path / "bad.csv", images=str(identities))
    few = tmp_path / "few"
    for label in ("id0001", "id0002", "id0003"):
        shutil.copytree(identities / label, few / label)
    (few / "lonely").mkdir()
    shutil.copy(identities / "id0004" / "0.jpg", few / "lonely" / "0.jpg")
    with pytest.warns(UserWarning, match="left out 1 of 4 labels with a single image.*lonely"):
        with pytest.raises(DataError, match="labels fall in the (val|test) split"):
            open_source(few, "labels")
    broken = tmp_path / "broken"
    shutil.copytree(identities, broken, ignore=shutil.ignore_patterns("*.csv"))
    (broken / "id0005" / "1.jpg").write_text("not a jpeg")
    with pytest.raises(DataError, match="1 images cannot be read: .*id0005/1.jpg"):
        train_labels(["--data", str(broken), "--dataset", "labels", "--model", "cir-tiny",
                      "--output", str(tmp_path / "never")] + BASE)
    assert not (tmp_path / "never").exists()


def test_training_improves_retrieval_on_held_out_labels_and_resumes(identities, tmp_path):
    args = ["--data", str(identities / "labels.csv"), "--model", "cir-tiny", "--epochs", "3",
            "--loss", "supcon", "--save-best"] + BASE
    assert train_labels(args + ["--output", str(tmp_path / "run")]) == 0
    log = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [0, 1, 2] and "MAP@R" in log[-1]["average"]
    out = tmp_path / "labels.json"
    assert evaluate_main(["--data", str(identities / "labels.csv"), "--task", "labels", "--clip-checkpoint",
                          str(tmp_path / "run" / "best.safetensors"), "--quiet", "--workers", "0",
                          "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) >= {"zero-shot", "fine-tuned"} and "attributes@10" in metrics["fine-tuned"]
    assert metrics["fine-tuned"]["MAP@R"] > metrics["zero-shot"]["MAP@R"] + 5
    # interrupted and resumed: the same weights as straight through
    assert train_labels(args + ["--output", str(tmp_path / "part"), "--max-steps", "4"]) == 0
    assert train_labels(args + ["--output", str(tmp_path / "part"), "--resume"]) == 0
    straight = load_encoder(RunDir(tmp_path / "run").latest_checkpoint() / "model.safetensors").model.state_dict()
    resumed = load_encoder(RunDir(tmp_path / "part").latest_checkpoint() / "model.safetensors").model.state_dict()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_timm_encoder_learns_and_serves_image_search(identities, tmp_path):
    args = ["--data", str(identities / "labels.csv"), "--model", "timm/mobilenetv3_small_050", "--embed-dim", "32",
            "--epochs", "1", "--loss", "triplet", "--output", str(tmp_path / "run")] + BASE
    assert train_labels(args) == 0
    encoder = RunDir(tmp_path / "run").latest_checkpoint() / "model.safetensors"
    assert type(load_encoder(encoder)).__name__ == "TimmEncoder"
    assert build_main(["--data", str(identities), "--dataset", "folder", "--clip-checkpoint", str(encoder),
                       "--output", str(tmp_path / "index"), "--quiet", "--workers", "0"]) == 0
    engine = SearchEngine.load(tmp_path / "index", device="cpu")
    some = engine.index.ids(1)[0]
    hits = engine.image_search(reference_id=some, k=5).hits
    assert len(hits) == 5 and some not in [h.id for h in hits]
    with pytest.raises(SearchError, match="reads images only"):
        engine.text_search("a red shirt")


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_learns_at_its_own_rates(name, identities):
    """A few steps at the loss's own rates (encoder and proxies) on batches of labelled images lower the loss on a
    fixed batch and bring its same-label images closer than other labels' images."""
    from clip4cir.data.datasets import LabelledImageDataset
    from clip4cir.models.factory import load_model
    spec = LOSSES[name]
    torch.manual_seed(0)
    encoder = load_model("cir-tiny", preprocess_kind="squarepad")
    data = LabelledImageDataset(open_source(identities / "labels.csv"), "train", encoder.transform)
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(data.labels):
        by_label.setdefault(label, []).append(i)
    chosen = [i for members in list(by_label.values())[:8] for i in members[:4]]
    images = torch.stack([data[i]["image"] for i in chosen])
    labels = torch.tensor([data.labels[i] for i in chosen])
    loss_fn, miner = make_loss(name, data.num_labels, encoder.dim)
    groups = [{"params": list(encoder.model.visual.parameters())}]
    if list(loss_fn.parameters()):
        groups.append({"params": list(loss_fn.parameters()), "lr": spec.lr * spec.proxy_lr_factor})
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=0.0)

    def margin() -> float:
        with torch.no_grad():
            x = F.normalize(encoder.encode_image(images), dim=-1)
        similarity, same = x @ x.T, labels[:, None] == labels[None, :]
        return float(similarity[same & ~torch.eye(len(x), dtype=torch.bool)].mean() - similarity[~same].mean())

    def evaluated_loss() -> float:  # averaged over draws: some losses sample their triplets
        encoder.model.eval()
        with torch.no_grad():
            return float(np.mean([float(labelled_loss(loss_fn, miner, encoder.encode_image(images), labels))
                                  for _ in range(5)]))

    before_loss, before_margin = evaluated_loss(), margin()
    for _ in range(25):
        encoder.model.train()
        loss = labelled_loss(loss_fn, miner, encoder.encode_image(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert evaluated_loss() < 0.9 * before_loss, (before_loss, evaluated_loss())
    assert margin() > before_margin, (before_margin, margin())


def test_a_collapse_is_warned_about_then_stops_the_run(caplog):
    """Collapsed: a margin loss at its margin with the embeddings all alike. A narrow cone alone is not (a small
    encoder's healthy embeddings fill one), nor is a loss without a margin."""
    from clip4cir.training.collapse import CollapseMonitor, TrainingCollapsed, spread
    assert spread(torch.ones(8, 4)) == pytest.approx(0.0, abs=1e-6)
    assert spread(torch.eye(8)) == pytest.approx(1.0)
    alike = torch.ones(8, 4) + 1e-4 * torch.randn(8, 4)
    monitor = CollapseMonitor(0.1, min_spread=0.02, patience=2, hint="try --loss supcon")
    monitor.step(torch.eye(8))
    assert monitor.end_epoch(0, 0.1) == {"embedding_spread": 1.0}  # at the margin, but spread out
    monitor.step(alike)
    monitor.end_epoch(1, 0.06)  # alike, but learning: below the margin
    assert monitor.collapsed_epochs == 0
    monitor.step(alike)
    with caplog.at_level("WARNING"):
        monitor.end_epoch(2, 0.099)
    assert "collapsed in epoch 3" in caplog.text and "try --loss supcon" in caplog.text
    monitor.step(torch.ones(8, 4))
    with pytest.raises(TrainingCollapsed, match="for 2 epochs in a row"):
        monitor.end_epoch(3, 0.1)
    no_margin = CollapseMonitor(None, patience=1)
    for epoch in range(3):
        no_margin.step(alike)
        no_margin.end_epoch(epoch, 12.0)  # a proxy loss with narrow embeddings goes on
    assert no_margin.collapsed_epochs == 0
