import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip4cir.commands.train_combiner import main as combiner_main
from clip4cir.core.errors import ModelError
from clip4cir.data.captions import eval_caption
from clip4cir.data.datasets import TripletDataset
from clip4cir.data.sources.fashioniq import FashionIQ
from clip4cir.models.combiner import Combiner, load_combiner, save_combiner
from clip4cir.models.encoder_file import save_encoder
from clip4cir.models.factory import create_model
from clip4cir.training.checkpointing import RunDir, read_metrics
from combiner.feature_cache import triplet_features
from combiner.stage_two import CombinedQuery, cached_batch, combiner_loss, encoded_batch

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


def test_cache_hits_for_the_same_inputs_and_misses_when_any_changes(tiny_root, tmp_path):
    encoder = create_model("cir-tiny")
    ds = TripletDataset(FashionIQ(tiny_root), "train", transform=encoder.transform)
    first, hit = triplet_features(encoder, ds, tmp_path / "cache", progress=False)
    assert not hit and first.text.shape == (4 * len(ds), encoder.dim) and first.offsets[-1] == 4 * len(ds)
    again, hit = triplet_features(encoder, ds, tmp_path / "cache", progress=False)
    assert hit and torch.equal(again.image, first.image)
    with torch.no_grad():
        encoder.model.visual.proj.mul_(2)  # a fine-tuned encoder, say
    encoder.invalidate_fingerprint()
    changed, hit = triplet_features(encoder, ds, tmp_path / "cache", progress=False)
    assert not hit and not torch.allclose(changed.image, first.image)
    other = create_model("cir-tiny", preprocess_kind="squarepad")  # same weights, other preprocessing
    _, hit = triplet_features(other, TripletDataset(FashionIQ(tiny_root), "train", transform=other.transform),
                              tmp_path / "cache", progress=False)
    assert not hit
    # the same encoder on changed data: an image redrawn, a caption edited, or another root
    encoder = create_model("cir-tiny")
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    _, hit = triplet_features(encoder, TripletDataset(FashionIQ(root), "train", transform=encoder.transform),
                              tmp_path / "cache", progress=False)
    assert not hit  # another root
    reference = ds.triplets[0].reference
    Image.new("RGB", (72, 100), (0, 255, 0)).save(root / "images" / f"{reference}.jpg")
    redrawn, hit = triplet_features(encoder, TripletDataset(FashionIQ(root), "train", transform=encoder.transform),
                                    tmp_path / "cache", progress=False)
    assert not hit and not torch.allclose(redrawn.image, first.image)
    captions = root / "captions" / "cap.dress.train.json"
    entries = json.loads(captions.read_text())
    entries[0]["captions"][0] = "is green"
    captions.write_text(json.dumps(entries))
    _, hit = triplet_features(encoder, TripletDataset(FashionIQ(root), "train", transform=encoder.transform),
                              tmp_path / "cache", progress=False)
    assert not hit


def test_a_broken_cache_file_is_computed_again(tiny_root, tmp_path):
    encoder = create_model("cir-tiny")
    ds = TripletDataset(FashionIQ(tiny_root), "train", transform=encoder.transform)
    first, _ = triplet_features(encoder, ds, tmp_path, progress=False)
    (path,) = tmp_path.glob("triplets.*.pt")
    path.write_bytes(path.read_bytes()[:1000])  # truncated by a full disk, say
    with pytest.warns(UserWarning, match=f"{path.name}.*cannot be read"):
        again, hit = triplet_features(encoder, ds, tmp_path, progress=False)
    assert not hit and torch.equal(again.image, first.image)
    _, hit = triplet_features(encoder, ds, tmp_path, progress=False)
    assert hit


@pytest.mark.parametrize("augment", [True, False])
def test_cached_features_equal_per_batch_encoding(tiny_root, tmp_path, augment):
    """With caption augmentation the cache serves the epoch's caption variant, without it the evaluation caption:
    in both cases what encoding the batch's own captions gives."""
    encoder = create_model("cir-tiny")
    ds = TripletDataset(FashionIQ(tiny_root), "train", transform=encoder.transform, randomize_captions=augment,
                        seed=3)
    features, _ = triplet_features(encoder, ds, tmp_path, progress=False)
    ds.set_epoch(2)
    idx = torch.arange(12)
    cached = cached_batch(features, idx, seed=3, epoch=2, randomize=augment)
    items = [ds[i] for i in idx.tolist()]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("reference", "target")}
    captions = [ds.caption(i) for i in idx.tolist()]
    assert (captions == [eval_caption(ds.triplets[i].captions) for i in idx.tolist()]) is not augment
    encoded = encoded_batch(encoder, batch, captions)
    for a, b in zip(cached, encoded, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_lowers_the_loss(tiny_root, tmp_path):
    encoder = create_model("cir-tiny")
    ds = TripletDataset(FashionIQ(tiny_root), "train", transform=encoder.transform)
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
    from clip4cir.commands.evaluate import main as evaluate_main
    encoder_path = tmp_path / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder_path)
    args = ["--data", str(tiny_root), "--clip-checkpoint", str(encoder_path), "--epochs", "3", "--save-best",
            "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert combiner_main(args + ["--output", str(full)]) == 0
    log = read_metrics(full / "metrics.jsonl")
    assert len(log) == 3 and (full / "best.safetensors").is_file() and list((full / "feature_cache").iterdir())
    assert combiner_main(args + ["--output", str(part), "--max-steps", "5"]) == 0
    assert combiner_main(args + ["--output", str(part), "--resume"]) == 0
    resumed = read_metrics(part / "metrics.jsonl")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in log], rel=1e-5)
    out = tmp_path / "m.json"
    assert evaluate_main(["--data", str(tiny_root), "--clip-checkpoint", str(encoder_path), "--combiner",
                          str(full / "best.safetensors"), "--json", str(out), "--quiet", "--workers", "0"]) == 0
    assert json.loads(out.read_text())["combiner"] == str(full / "best.safetensors")
    _, meta = load_combiner(full / "best.safetensors")
    assert meta["data"]["train"]["triplets"] == 36 and meta["encoder"]["fingerprint"]
    # a combiner refuses features of another encoder, naming both files
    other = tmp_path / "other.safetensors"
    save_encoder(create_model("cir-tiny", seed=5), other)
    with pytest.raises(ModelError, match=f"{full / 'best.safetensors'}.*trained on features.*{other}"):
        evaluate_main(["--data", str(tiny_root), "--clip-checkpoint", str(other), "--combiner",
                       str(full / "best.safetensors"), "--quiet", "--workers", "0"])


def test_cold_and_warm_feature_cache_give_the_same_run(tiny_root, tmp_path):
    """Same seed, same numbers, whatever the cache state (building the cache must not consume the random state
    that dropout then draws from)."""
    encoder_path = tmp_path / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder_path)
    args = ["--data", str(tiny_root), "--clip-checkpoint", str(encoder_path), "--epochs", "2", "--batch-size", "8",
            "--lr", "1e-3", "--workers", "0", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert combiner_main(args + ["--output", str(tmp_path / "cold")]) == 0
    assert combiner_main(args + ["--output", str(tmp_path / "warm")]) == 0
    cold, warm = (load_combiner(RunDir(tmp_path / name).latest_checkpoint() / "model.safetensors")[0]
                  for name in ("cold", "warm"))
    for (k, v), w in zip(cold.state_dict().items(), warm.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    assert read_metrics(tmp_path / "cold" / "metrics.jsonl")[-1]["loss"] == \
        read_metrics(tmp_path / "warm" / "metrics.jsonl")[-1]["loss"]


def test_bad_inputs(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="give the encoder"):
        combiner_main(["--data", str(tiny_root), "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--batch-size 1024"):
        combiner_main(["--data", str(tiny_root), "--output", str(tmp_path / "o")] + BASE + ["--batch-size", "1024"])
    with pytest.raises(SystemExit):  # argparse: "argument --proj-dim: must be a whole number from 1 ..."
        combiner_main(["--data", str(tiny_root), "--output", str(tmp_path / "o")] + BASE + ["--proj-dim", "-1"])
    assert not (tmp_path / "o").exists()
