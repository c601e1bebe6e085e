import json

import pytest
import torch
import torch.nn.functional as F

from clip4cir.data import TripletDataset
from clip4cir.models import ModelError, create_model, save_encoder
from combiner.feature_cache import triplet_features
from combiner.model import Combiner, load_combiner, save_combiner
from combiner.train import CombinedQuery, cached_batch, combiner_loss, encoded_batch, main as combiner_main

BASE = ["--model", "cir-tiny", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--quiet"]


def reference_forward(sd, image, text, target):
    """CLIP4Cir's Combiner written out by hand (eval mode: dropout is the identity)."""
    def linear(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
    t = F.relu(linear(text, "text_projection_layer"))
    i = F.relu(linear(image, "image_projection_layer"))
    raw = torch.cat([t, i], -1)
    lam = torch.sigmoid(linear(F.relu(linear(raw, "dynamic_scalar.0")), "dynamic_scalar.3"))
    out = linear(F.relu(linear(raw, "combiner_layer")), "output_layer") + lam * text + (1 - lam) * image
    out = out / out.norm(dim=-1, keepdim=True)
    return 100 * out @ (target / target.norm(dim=-1, keepdim=True)).T


def test_forward_matches_hand_written_reference():
    torch.manual_seed(0)
    combiner = Combiner(16).eval()
    assert (combiner.projection_dim, combiner.hidden_dim) == (64, 128)
    image, text, target = torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 16)
    expected = reference_forward(combiner.state_dict(), image, text, target)
    torch.testing.assert_close(combiner(image, text, target), expected, rtol=1e-5, atol=1e-4)
    assert combiner.combine(image, text).norm(dim=-1).allclose(torch.ones(5))


def test_clip4cir_combiner_checkpoint_loads_unchanged(tmp_path):
    torch.manual_seed(1)
    original = Combiner(32, 40, 50).eval()
    torch.save({"epoch": 12, "Combiner": original.state_dict()}, tmp_path / "combiner.pt")
    loaded, meta = load_combiner(tmp_path / "combiner.pt")
    assert (loaded.feature_dim, loaded.projection_dim, loaded.hidden_dim) == (32, 40, 50)
    assert meta["info"] == {"epoch": 12}
    x, y = torch.randn(3, 32), torch.randn(3, 32)
    torch.testing.assert_close(loaded.combine(x, y), original.combine(x, y))
    save_combiner(loaded, tmp_path / "c.safetensors", encoder={"fingerprint": "abc"}, info={"epoch": 12})
    again, meta = load_combiner(tmp_path / "c.safetensors")
    assert meta["encoder"] == {"fingerprint": "abc"}
    torch.testing.assert_close(again.combine(x, y), original.combine(x, y))
    torch.save({"Other": {}}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="not a Combiner"):
        load_combiner(tmp_path / "bad.pt")


def test_cache_hits_for_the_same_encoder_and_misses_when_it_changes(tiny_root, tmp_path):
    encoder = create_model("cir-tiny")
    ds = TripletDataset(tiny_root, "train", transform=encoder.transform)
    first, hit = triplet_features(encoder, ds, tmp_path, progress=False)
    assert not hit and first.text.shape == (len(ds), 4, encoder.dim)
    again, hit = triplet_features(encoder, ds, tmp_path, progress=False)
    assert hit and torch.equal(again.image, first.image)
    with torch.no_grad():
        encoder.model.visual.proj.mul_(2)  # a fine-tuned encoder, say
    encoder.invalidate_fingerprint()
    changed, hit = triplet_features(encoder, ds, tmp_path, progress=False)
    assert not hit and not torch.allclose(changed.image, first.image)
    other = create_model("cir-tiny", preprocess_kind="squarepad")  # same weights, other preprocessing
    _, hit = triplet_features(other, TripletDataset(tiny_root, "train", transform=other.transform), tmp_path,
                              progress=False)
    assert not hit


def test_cached_features_equal_per_batch_encoding(tiny_root, tmp_path):
    encoder = create_model("cir-tiny")
    ds = TripletDataset(tiny_root, "train", transform=encoder.transform, randomize_captions=True, seed=3)
    features, _ = triplet_features(encoder, ds, tmp_path, progress=False)
    ds.set_epoch(2)
    idx = torch.tensor([0, 5, 7])
    cached = cached_batch(features, idx, seed=3, epoch=2)
    items = [ds[i] for i in idx.tolist()]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("reference", "target")}
    encoded = encoded_batch(encoder, batch, [ds.caption(i) for i in idx.tolist()])
    for a, b in zip(cached, encoded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_lowers_the_loss(tiny_root, tmp_path):
    encoder = create_model("cir-tiny")
    ds = TripletDataset(tiny_root, "train", transform=encoder.transform)
    features, _ = triplet_features(encoder, ds, tmp_path, progress=False)
    torch.manual_seed(0)
    combiner = Combiner(encoder.dim)
    optimizer = torch.optim.Adam(combiner.parameters(), lr=1e-3)
    batch = cached_batch(features, torch.arange(16), seed=0, epoch=0)
    losses = []
    for _ in range(30):
        loss = combiner_loss(CombinedQuery(combiner), *batch, amp_dtype=None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_command_trains_resumes_and_evaluates(tiny_root, tmp_path):
    from clip4cir.evaluate import main as evaluate_main
    encoder_path = tmp_path / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder_path)
    args = ["--data", str(tiny_root), "--clip-checkpoint", str(encoder_path), "--epochs", "3", "--save-best",
            "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert combiner_main(args + ["--output", str(full)]) == 0
    log = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 3 and (full / "best.safetensors").is_file() and list((full / "feature_cache").iterdir())
    assert combiner_main(args + ["--output", str(part), "--max-steps", "5"]) == 0
    assert combiner_main(args + ["--output", str(part), "--resume"]) == 0
    resumed = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in log], rel=1e-5)
    out = tmp_path / "m.json"
    assert evaluate_main(["--data", str(tiny_root), "--clip-checkpoint", str(encoder_path), "--combiner",
                          str(full / "best.safetensors"), "--json", str(out), "--quiet", "--workers", "0"]) == 0
    assert json.loads(out.read_text())["combiner"] == str(full / "best.safetensors")
    # a combiner refuses features of another encoder
    with pytest.raises(ModelError, match="trained on features"):
        evaluate_main(["--data", str(tiny_root), "--model", "cir-tiny", "--seed", "5", "--combiner",
                       str(full / "best.safetensors"), "--quiet", "--workers", "0"])


def test_bad_inputs(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="frozen encoders"):
        combiner_main(["--data", str(tiny_root), "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--batch-size 1024"):
        combiner_main(["--data", str(tiny_root), "--output", str(tmp_path / "o")] + BASE + ["--batch-size", "1024"])
    assert not (tmp_path / "o").exists()
