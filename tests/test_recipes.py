
"""Each component of a recipe changes the loss, the batches or the ranking as it says, and ``--recipe clip4cir``
is the paper's training, step for step."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler

from clip4cir.commands.train_clip import main as train_main
from clip4cir.commands.train_clip import parse_args
from clip4cir.commands.train_combiner import main as combiner_main
from clip4cir.data.captions import eval_caption, random_caption_variant
from clip4cir.data.datasets import TripletDataset
from clip4cir.data.sources.fashioniq import FashionIQ
from clip4cir.evaluation.ranking import target_ranks
from clip4cir.models.combiner import Combiner, load_combiner
from clip4cir.models.encoder_file import save_encoder
from clip4cir.models.factory import create_model
from clip4cir.models.feature_sum import combine_sum
from clip4cir.training.checkpointing import RunDir
from clip4cir.training.losses import LOGIT_SCALE, Temperature, contrastive_loss
from clip4cir.training.recipes import RECIPES
from clip4cir.training.samplers import EpochSampler
from clip4cir.training.stage_one import training_triplets
from combiner.feature_cache import triplet_features


def batch(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_the_bank_loss_is_in_batch_infonce_when_the_bank_holds_the_batch_targets():
    query, target = batch()
    in_batch = contrastive_loss(query, target)
    assert contrastive_loss(query, target, bank=target, bank_targets=torch.arange(6)) == pytest.approx(in_batch.item())
    # a bank with more images: the same query-target pairs, more negatives, a larger loss
    extra = torch.randn(20, 8, generator=torch.Generator().manual_seed(5))
    bigger = contrastive_loss(query, target, bank=torch.cat([extra, target]), bank_targets=torch.arange(6) + 20)
    assert bigger > in_batch


def test_the_symmetric_term_is_the_transposed_logits():
    query, target = batch()
    logits = LOGIT_SCALE * F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(contrastive_loss(query, target, symmetric=True), expected)
    assert contrastive_loss(query, target) == pytest.approx(F.cross_entropy(logits, labels).item())


def test_label_smoothing_and_a_learned_temperature():
    query, target = batch()
    logits = LOGIT_SCALE * F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T
    smoothed = contrastive_loss(query, target, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, torch.arange(6), label_smoothing=0.1))
    fixed, learned = Temperature(False), Temperature(True)
    assert fixed() == LOGIT_SCALE and not fixed.log_scale.requires_grad
    assert float(learned().detach()) == pytest.approx(LOGIT_SCALE)  # starts where CLIP4Cir fixes it
    contrastive_loss(query, target, scale=learned()).backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad != 0  # and can move
    with torch.no_grad():
        learned.log_scale += 10  # pushed far up: capped
    assert float(learned().detach()) == pytest.approx(1000.0)


def test_hard_negative_batches_hold_one_category_and_every_triplet_each_epoch():
    categories = ["dress"] * 40 + ["shirt"] * 25 + ["toptee"] * 35
    sampler = EpochSampler(100, 8, seed=3, groups=categories)
    order = list(sampler)
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    # as many steps as random batches: a category's leftovers are pooled into mixed batches, not dropped
    assert len(batches) == sampler.batches_per_epoch() == EpochSampler(100, 8, seed=3).batches_per_epoch() == 12
    assert len(set(order)) == len(order) == 96
    single = [b for b in batches if len({categories[i] for i in b}) == 1]
    assert len(single) == 40 // 8 + 25 // 8 + 35 // 8  # every full batch of one category is kept whole
    assert {categories[b[0]] for b in single} == {"dress", "shirt", "toptee"}
    assert list(EpochSampler(100, 8, seed=3, groups=categories)) == order  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != order
    # two processes at batch 4 take slices of the same global batches
    ranks = [list(EpochSampler(100, 4, seed=3, rank=r, world_size=2, groups=categories)) for r in range(2)]
    for b in range(len(batches)):
        assert sorted(ranks[0][4 * b:4 * b + 4] + ranks[1][4 * b:4 * b + 4]) == sorted(batches[b])


def test_the_learned_temperature_moves_at_its_own_rate_at_the_papers_learning_rate(tiny_root, tmp_path):
    """At CLIP4Cir's lr 2e-6 the scale's own rate (1e-3) moves it; at the base rate it would not have moved."""
    out = tmp_path / "run"
    assert train_main(["--data", str(tiny_root), "--output", str(out), "--model", "cir-tiny", "--batch-size", "8",
                       "--lr", "2e-6", "--learn-temperature", "--epochs", "2", "--workers", "0", "--quiet"]) == 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = log[-1]["step"]
    assert abs(np.log(log[-1]["logit_scale"]) - np.log(LOGIT_SCALE)) > 0.5 * 1e-3 * steps  # Adam: ~rate a step
    assert abs(np.log(log[-1]["logit_scale"]) - np.log(LOGIT_SCALE)) > 100 * 2e-6 * steps  # the base rate: no
    params = json.loads((out / "params.json").read_text())
    assert params["temperature_lr"] == 1e-3 and params["learn_temperature"] is True


def test_stage_one_plus_trains_every_component_end_to_end(tiny_root, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(tiny_root), "--output", str(out), "--model", "cir-tiny", "--batch-size", "8", "--lr",
            "1e-3", "--recipe", "plus", "--workers", "0", "--quiet", "--save-best"]
    assert train_main(args + ["--epochs", "1"]) == 0
    params = json.loads((out / "params.json").read_text())
    assert {k: params[k] for k in asdict(RECIPES["plus"]) if k not in ("gallery_negatives", "blend")} == \
        {k: v for k, v in asdict(RECIPES["plus"]).items() if k not in ("gallery_negatives", "blend")}
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["logit_scale"] != pytest.approx(LOGIT_SCALE) and np.isfinite(log[0]["loss"])
    assert train_main(args + ["--epochs", "2", "--resume"]) == 0  # and it resumes with the same components
    assert len([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]) == 2


def test_blending_ranks_by_the_blend_of_the_two_scores():
    torch.manual_seed(0)
    combiner = Combiner(16).eval()
    image, text = torch.randn(5, 16), torch.randn(5, 16)
    gallery = F.normalize(torch.randn(30, 16), dim=-1)
    torch.testing.assert_close(combiner.combine(image, text, blend=0.0), combine_sum(image, text))
    torch.testing.assert_close(combiner.combine(image, text, blend=1.0), combiner.combine(image, text))
    weight = 0.3
    scores = weight * combiner.combine(image, text, blend=1.0) @ gallery.T + \
        (1 - weight) * combine_sum(image, text) @ gallery.T
    blended = combiner.combine(image, text, blend=weight) @ gallery.T
    torch.testing.assert_close(blended, scores)
    targets = torch.randint(0, 30, (5,))
    expected = torch.tensor([int((s > s[t]).sum()) for s, t in zip(scores, targets, strict=True)])
    assert target_ranks(combiner.combine(image, text, blend=weight), gallery, targets).tolist() == expected.tolist()


def test_recipe_clip4cir_trains_the_combiner_exactly_as_the_paper(tiny_root, tmp_path):
    """The trainer's --recipe clip4cir against CLIP4Cir's stage-two step written out here: Adam, 100 · cosine
    logits over the batch's targets, cross-entropy against the diagonal, the four caption variants."""
    encoder = create_model("cir-tiny")
    save_encoder(encoder, tmp_path / "enc.safetensors")
    seed, lr, size, epochs = 3, 1e-3, 8, 2
    assert combiner_main(["--data", str(tiny_root), "--clip-checkpoint", str(tmp_path / "enc.safetensors"),
                          "--output", str(tmp_path / "run"), "--epochs", str(epochs), "--batch-size", str(size),
                          "--lr", str(lr), "--seed", str(seed), "--workers", "0", "--quiet", "--recipe", "clip4cir",
                          "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]) == 0
    trained, _ = load_combiner(RunDir(tmp_path / "run").latest_checkpoint() / "model.safetensors")
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert {k: params[k] for k in asdict(RECIPES["clip4cir"])} == asdict(RECIPES["clip4cir"])

    dataset = TripletDataset(FashionIQ(tiny_root), "train", transform=encoder.transform)
    features, hit = triplet_features(encoder, dataset, tmp_path / "cache", progress=False)
    assert hit
    torch.manual_seed(seed)
    combiner = Combiner(encoder.dim)
    optimizer = torch.optim.Adam(combiner.parameters(), lr=lr)
    torch.manual_seed(seed)
    sampler = EpochSampler(len(dataset), size, seed)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        combiner.train()
        for indices in BatchSampler(sampler, size, drop_last=True):
            variants = [random_caption_variant(seed, epoch, i) for i in indices]
            reference = features.image[features.reference[indices]]
            text = features.text[features.offsets[indices] + torch.tensor(variants)]
            target = features.image[features.target[indices]]
            query = combiner.combine_features(reference, text)
            logits = 100 * F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T
            loss = F.cross_entropy(logits, torch.arange(len(indices)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, expected), got in zip(combiner.state_dict().items(), trained.state_dict().values(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_plus_trains_every_component_and_records_it(tiny_root, tmp_path):
    encoder = tmp_path / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder)
    assert combiner_main(["--data", str(tiny_root), "--clip-checkpoint", str(encoder), "--output",
                          str(tmp_path / "run"), "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--workers",
                          "0", "--quiet", "--recipe", "plus", "--save-best", "--device", "cpu"]) == 0
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert {k: params[k] for k in asdict(RECIPES["plus"])} == asdict(RECIPES["plus"])
    best, meta = load_combiner(tmp_path / "run" / "best.safetensors")
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= best.blend <= 1 and best.blend in [r["blend"] for r in log]
    assert np.isfinite([r["loss"] for r in log]).all()
    state = torch.load(RunDir(tmp_path / "run").latest_checkpoint() / "state.pt", weights_only=False)
    # the learned temperature moved; resumed from here
    assert state["modules"]["temperature"]["log_scale"] != pytest.approx(np.log(100))
    with pytest.raises(ValueError, match="--gallery-negatives needs cached features"):
        combiner_main(["--data", str(tiny_root), "--clip-checkpoint", str(encoder), "--output", str(tmp_path / "x"),
                       "--recipe", "plus", "--reencode"])


@pytest.mark.parametrize("augment", [True, False])
def test_caption_augmentation_draws_a_variant_each_epoch_or_always_the_evaluation_caption(tiny_root, augment):
    encoder = create_model("cir-tiny")
    flag = "--caption-augmentation" if augment else "--no-caption-augmentation"
    config = parse_args(["--data", str(tiny_root), "--output", "unused", "--model", "cir-tiny", "--batch-size", "8",
                         flag])
    assert config.caption_augmentation is augment
    train_set = training_triplets(FashionIQ(tiny_root), encoder, config, world_size=1)
    read = set()
    for epoch in range(4):
        train_set.set_epoch(epoch)
        read |= {(i, train_set.caption(i)) for i in range(len(train_set))}
    evaluation = {(i, eval_caption(t.captions)) for i, t in enumerate(train_set.triplets)}
    assert (read == evaluation) is not augment  # with it, other variants too; without, only the first



def test_a_run_made_before_caption_augmentation_existed_resumes_with_it_on(tiny_root, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(tiny_root), "--output", str(out), "--model", "cir-tiny", "--batch-size", "8", "--workers",
            "0", "--quiet"]
    assert train_main(args + ["--epochs", "1"]) == 0
    params = json.loads((out / "params.json").read_text())
    del params["caption_augmentation"]  # what an older version wrote
    (out / "params.json").write_text(json.dumps(params))
    assert train_main(args + ["--epochs", "2", "--resume"]) == 0
    with pytest.raises(Exception, match="--caption-augmentation was True, now False"):
        train_main(args + ["--epochs", "3", "--resume", "--no-caption-augmentation"])
