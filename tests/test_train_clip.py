import json
import shutil

import pytest
import torch

from clip4cir.data import DataError, TripletDataset
from clip4cir.models import ModelError, create_model, load_encoder
from clip4cir.train import (TowerFeatures, contrastive_loss, main as train_main, set_train_mode, set_trainable,
                            training_step)

BASE = ["--model", "cir-tiny", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--quiet"]


def fixed_batch(root, encoder, n=8):
    ds = TripletDataset(root, "train", transform=encoder.transform)
    items = [ds[i] for i in range(n)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("reference", "target")}
    return batch, [it["caption"] for it in items]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_is_cross_entropy_of_scaled_cosines():
    query, target = torch.randn(4, 8), torch.randn(4, 8)
    logits = 100 * torch.nn.functional.normalize(query, dim=-1) @ torch.nn.functional.normalize(target, dim=-1).T
    expected = -torch.log_softmax(logits, 1).diagonal().mean()
    torch.testing.assert_close(contrastive_loss(query, target), expected)


def test_real_step_changes_weights_and_lowers_loss_on_fixed_batch(tiny_root):
    encoder = create_model("cir-tiny")
    batch, captions = fixed_batch(tiny_root, encoder)
    params = set_trainable(encoder.model, "both")
    optimizer = torch.optim.AdamW(params, lr=1e-3, eps=1e-7)
    before = snapshot(encoder.model)
    set_train_mode(encoder.model, "both")
    losses = []
    for _ in range(5):
        loss = training_step(TowerFeatures(encoder, "both"), encoder, batch, captions, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(before[k], v) for k, v in encoder.model.state_dict().items())


@pytest.mark.parametrize("towers", ["image", "text"])
def test_frozen_tower_does_not_change_and_has_no_optimizer_state(tiny_root, towers):
    encoder = create_model("cir-tiny")
    batch, captions = fixed_batch(tiny_root, encoder)
    params = set_trainable(encoder.model, towers)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before = snapshot(encoder.model)
    loss = training_step(TowerFeatures(encoder, towers), encoder, batch, captions, None)
    loss.backward()
    optimizer.step()
    after = encoder.model.state_dict()
    frozen_prefix = "visual." if towers == "text" else ("transformer.", "token_embedding", "ln_final")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith(frozen_prefix) for k in changed)
    assert all(p.requires_grad for p in params)
    assert len(optimizer.state) == len([p for p in params if p.grad is not None])
    frozen = [p for n, p in encoder.model.named_parameters() if n.startswith(frozen_prefix)]
    assert all(p.grad is None and not p.requires_grad for p in frozen)


def test_batchnorm_stays_in_eval_mode():
    encoder = create_model("cir-tiny-rn")
    set_train_mode(encoder.model, "both")
    norms = [m for m in encoder.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms) and encoder.model.transformer.training


def run_files(out):
    return {p.name for p in out.iterdir()}


def test_training_writes_run_files_and_resume_is_exact(tiny_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--data", str(tiny_root), "--epochs", "2", "--save-best"] + BASE
    assert train_main(args + ["--output", str(full)]) == 0
    assert {"params.json", "metrics.jsonl", "last.safetensors", "last.state.pt", "best.safetensors"} <= run_files(full)
    params = json.loads((full / "params.json").read_text())
    assert params["lr"] == 1e-3 and params["encoder"] == "both" and params["batch_size"] == 8
    log = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert {"loss", "dress", "shirt", "toptee", "average", "seconds", "triplets_per_s"} <= set(log[0])

    # interrupted mid-epoch (36 triplets / batch 8 = 4 steps an epoch; stop after 6), then resumed
    assert train_main(args + ["--output", str(part), "--max-steps", "6"]) == 0
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 1
    assert train_main(args + ["--output", str(part), "--resume"]) == 0
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(log, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["average"] == pytest.approx(b["average"])
    full_model, part_model = load_encoder(full / "last.safetensors"), load_encoder(part / "last.safetensors")
    for (k, v), w in zip(full_model.model.state_dict().items(), part_model.model.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)


def test_bad_inputs_exit_cleanly_and_overwrite_nothing(tiny_root, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="does not exist"):
        train_main(["--data", str(tmp_path / "missing"), "--output", str(out)] + BASE)
    assert not out.exists()
    with pytest.raises(ValueError, match="--batch-size 500"):
        train_main(["--data", str(tiny_root), "--output", str(out)] + BASE + ["--batch-size", "500"])
    with pytest.raises(ModelError, match="'nope'"):
        train_main(["--data", str(tiny_root), "--output", str(out), "--model", "nope", "--quiet"])
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="bad.pt"):
        train_main(["--data", str(tiny_root), "--output", str(out), "--clip-checkpoint", str(tmp_path / "bad.pt"),
                    "--quiet"])
    empty = tmp_path / "empty"
    shutil.copytree(tiny_root, empty)
    for category in ("dress", "shirt", "toptee"):
        (empty / "captions" / f"cap.{category}.train.json").write_text("[]")
    with pytest.raises(DataError, match="no train triplets"):
        train_main(["--data", str(empty), "--output", str(out)] + BASE)
    assert not out.exists()
    with pytest.raises(DataError, match="holds no run"):
        train_main(["--data", str(tiny_root), "--output", str(out), "--resume"] + BASE)
    # an existing run is never overwritten
    assert train_main(["--data", str(tiny_root), "--output", str(out), "--epochs", "1"] + BASE) == 0
    before = (out / "last.safetensors").read_bytes()
    with pytest.raises(DataError, match="already holds a run"):
        train_main(["--data", str(tiny_root), "--output", str(out), "--epochs", "1"] + BASE)
    with pytest.raises(DataError, match="lr was"):
        train_main(["--data", str(tiny_root), "--output", str(out), "--epochs", "2", "--resume"] + BASE
                   + ["--lr", "0.1"])
    assert (out / "last.safetensors").read_bytes() == before


def test_grad_checkpointing_gives_the_same_gradients(tiny_root):
    grads = []
    for checkpointing in (False, True):
        encoder = create_model("cir-tiny")
        set_trainable(encoder.model, "both")
        encoder.model.set_grad_checkpointing(checkpointing)
        set_train_mode(encoder.model, "both")
        batch, captions = fixed_batch(tiny_root, encoder)
        training_step(TowerFeatures(encoder, "both"), encoder, batch, captions, None).backward()
        grads.append({n: p.grad for n, p in encoder.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
