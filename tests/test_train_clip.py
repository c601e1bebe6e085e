import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO

from clip4cir.commands.train_clip import main as train_main
from clip4cir.core.errors import DataError, ModelError, NonFiniteError
from clip4cir.data.datasets import TripletDataset
from clip4cir.data.sources.fashioniq import FashionIQ
from clip4cir.models.encoder_file import load_encoder, read_encoder_metadata
from clip4cir.models.factory import create_model
from clip4cir.training.checkpointing import RunDir, read_metrics
from clip4cir.training.losses import contrastive_loss
from clip4cir.training.stage_one import TowerFeatures, set_train_mode, set_trainable, training_step

BASE = ["--model", "cir-tiny", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--quiet"]


def last_model(out):
    """The model of a run's newest complete checkpoint."""
    return RunDir(out).latest_checkpoint() / "model.safetensors"


def same_weights(a, b):
    first, second = load_encoder(a).model.state_dict(), load_encoder(b).model.state_dict()
    for (k, v), w in zip(first.items(), second.values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)


def fixed_batch(root, encoder, n=8):
    ds = TripletDataset(FashionIQ(root), "train", transform=encoder.transform)
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


def test_training_writes_run_files_and_resume_is_exact(tiny_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--data", str(tiny_root), "--epochs", "2", "--save-best"] + BASE
    assert train_main(args + ["--output", str(full)]) == 0
    assert {p.name for p in full.iterdir()} == {"params.json", "metrics.jsonl", "checkpoints", "best.safetensors"}
    assert [p.name for p in (full / "checkpoints").iterdir()] != []
    assert {p.name for p in last_model(full).parent.iterdir()} == {"model.safetensors", "state.pt", "metrics.jsonl",
                                                                   "manifest.json"}
    params = json.loads((full / "params.json").read_text())
    assert params["lr"] == 1e-3 and params["encoder"] == "both" and params["batch_size"] == 8
    data = params["training_data"]
    assert data["train"]["triplets"] == 36 and data["skipped_empty_captions"] == 0
    log = read_metrics(full / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [0, 1]
    assert {"loss", "dress", "shirt", "toptee", "average", "seconds", "samples_per_s"} <= set(log[0])
    info = load_encoder(last_model(full)).info
    assert info["global_step"] == 8 and info["data"]["train"]["fingerprint"] == data["train"]["fingerprint"]

    # interrupted mid-epoch (36 triplets / batch 8 = 4 steps an epoch; stop after 6), then resumed
    assert train_main(args + ["--output", str(part), "--max-steps", "6"]) == 0
    assert len(read_metrics(part / "metrics.jsonl")) == 1
    # a kill while logging leaves a cut line: --resume restores the log from the checkpoint
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "lo')
    assert train_main(args + ["--output", str(part), "--resume"]) == 0
    resumed = read_metrics(part / "metrics.jsonl")
    assert len(resumed) == 2
    for a, b in zip(log, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["average"] == pytest.approx(b["average"])
    same_weights(last_model(full), last_model(part))
    same_weights(full / "best.safetensors", part / "best.safetensors")
    # the resumed run records where its weights came from, not its own checkpoint (pruned later)
    assert read_encoder_metadata(last_model(part))["source"] == read_encoder_metadata(last_model(full))["source"]


def test_a_diverging_run_stops_at_the_step_and_keeps_nothing_broken(tiny_root, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):  # argparse: "argument --lr: must be a finite number in (0, inf), got inf"
        train_main(["--data", str(tiny_root), "--output", str(out), "--lr", "inf"] + BASE[:2] + ["--quiet"])
    assert not out.exists()
    args = ["--data", str(tiny_root), "--output", str(out), "--epochs", "3", "--save-best"] + BASE + ["--lr", "1e30"]
    with pytest.raises(NonFiniteError, match=r"NaN or infinite at epoch 1, step \d|loss became (nan|inf) at epoch 1"):
        train_main(args)
    assert not (out / "best.safetensors").exists() and RunDir(out).latest_checkpoint() is None
    assert read_metrics(out / "metrics.jsonl") == []


def test_killed_mid_save_leaves_the_last_complete_checkpoint(tiny_root, tmp_path):
    """A checkpoint folder whose writing was cut short (no manifest, or a file that does not match it) is passed
    over: --resume continues from the newest complete one."""
    out = tmp_path / "out"
    args = ["--data", str(tiny_root), "--output", str(out), "--epochs", "2"] + BASE
    assert train_main(args + ["--max-steps", "3", "--save-every", "1"]) == 0
    steps = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in steps] == ["step-000000002", "step-000000003"]
    (steps[-1] / "manifest.json").unlink()  # as if killed before the commit
    shutil.copytree(steps[0], out / "checkpoints" / "step-000000004")  # a folder that is not what it says
    with pytest.warns(UserWarning, match="passing over"):
        assert RunDir(out).latest_checkpoint() == steps[0]
    full = tmp_path / "full"
    assert train_main(["--data", str(tiny_root), "--output", str(full), "--epochs", "2"] + BASE) == 0
    with pytest.warns(UserWarning, match="passing over"):
        assert train_main(args + ["--resume"]) == 0
    same_weights(last_model(full), last_model(out))
    assert len([p for p in (out / "checkpoints").iterdir() if ".broken-" in p.name]) == 2  # kept, out of the way


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
    with pytest.raises(DataError, match="holds no run to resume"):
        train_main(["--data", str(tiny_root), "--output", str(out), "--resume"] + BASE)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        train_main(["--data", str(tiny_root), "--output", str(tmp_path / "a-file")] + BASE)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds other files"):
        train_main(["--data", str(tiny_root), "--output", str(user)] + BASE)
    # an existing run is never overwritten
    assert train_main(["--data", str(tiny_root), "--output", str(out), "--epochs", "1"] + BASE) == 0
    before = last_model(out).read_bytes()
    with pytest.raises(DataError, match="already holds a run"):
        train_main(["--data", str(tiny_root), "--output", str(out), "--epochs", "1"] + BASE)
    with pytest.raises(DataError, match="lr was"):
        train_main(["--data", str(tiny_root), "--output", str(out), "--epochs", "2", "--resume"] + BASE
                   + ["--lr", "0.1"])
    assert last_model(out).read_bytes() == before


def test_every_image_the_run_reads_is_checked_before_the_first_step(tiny_root, tmp_path):
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    val_only = json.loads((root / "image_splits" / "split.toptee.val.json").read_text())[-1]  # a gallery image
    (root / "images" / f"{val_only}.jpg").unlink()
    started = time.perf_counter()
    with pytest.raises(DataError, match=f"val gallery images: 1 of 24 miss images.*{val_only}"):
        train_main(["--data", str(root), "--output", str(tmp_path / "out")] + BASE)
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - started < 30  # not after an epoch: nothing was loaded or trained


def test_empty_captions_are_skipped_in_training_and_counted(tiny_root, tmp_path):
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    path = root / "captions" / "cap.dress.train.json"
    entries = json.loads(path.read_text())
    entries[0]["captions"][1], entries[1]["captions"][0] = "", "n/a"
    path.write_text(json.dumps(entries))
    with pytest.warns(UserWarning, match="skipped 2 of 36 train triplets with an empty caption"):
        assert train_main(["--data", str(root), "--output", str(tmp_path / "out"), "--max-steps", "1"] + BASE) == 0
    data = json.loads((tmp_path / "out" / "params.json").read_text())["training_data"]
    assert data["skipped_empty_captions"] == 2 and data["train"]["triplets"] == 34


def start_training(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "clip4cir", "train"] + args, env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_at_random_moments(args: list[str], out: Path, kills: int, seed: int) -> int:
    """Run training, SIGKILL it ``kills`` times (alternately inside a checkpoint save, caught by its temporary
    folder, and at a random moment after a checkpoint), resuming each time; then let it finish."""
    rng = random.Random(seed)
    killed = 0
    while True:
        resume = (out / "params.json").is_file()
        process = start_training(args + (["--resume"] if resume else []))
        if killed < kills:
            before = {p.name for p in (out / "checkpoints").glob("step-*")} if (out / "checkpoints").is_dir() else set()
            inside_save = killed % 2 == 0
            delay = rng.uniform(0, 0.4)
            while process.poll() is None:
                folder = out / "checkpoints"
                names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
                if inside_save and any(n.startswith(".step-") for n in names):
                    break
                if not inside_save and names - before - {n for n in names if n.startswith(".")}:
                    time.sleep(delay)
                    break
                time.sleep(0.001)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                killed += 1
                continue
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        return killed


def test_killed_at_random_moments_resumes_to_the_same_weights(tiny_root, tmp_path):
    args = ["--data", str(tiny_root), "--epochs", "3", "--save-best", "--save-every", "1", "--device", "cpu"] + BASE
    straight = tmp_path / "straight"  # the same process set-up (threads) as the killed run: the same float sums
    assert kill_at_random_moments(args + ["--output", str(straight)], straight, kills=0, seed=0) == 0
    out = tmp_path / "killed"
    assert kill_at_random_moments(args + ["--output", str(out)], out, kills=3, seed=0) >= 2
    same_weights(last_model(tmp_path / "straight"), last_model(out))
    same_weights(tmp_path / "straight" / "best.safetensors", out / "best.safetensors")
    assert [r["loss"] for r in read_metrics(out / "metrics.jsonl")] == \
        pytest.approx([r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")], rel=1e-5)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_killed_twenty_times_in_a_row_resumes_to_the_same_weights(tiny_root, tmp_path):
    args = ["--data", str(tiny_root), "--epochs", "6", "--save-best", "--save-every", "1", "--device", "cpu"] + BASE
    straight = tmp_path / "straight"
    assert kill_at_random_moments(args + ["--output", str(straight)], straight, kills=0, seed=0) == 0
    out = tmp_path / "killed"
    assert kill_at_random_moments(args + ["--output", str(out)], out, kills=20, seed=1) == 20
    same_weights(last_model(tmp_path / "straight"), last_model(out))
    same_weights(tmp_path / "straight" / "best.safetensors", out / "best.safetensors")


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


def test_an_unreadable_image_in_a_worker_is_one_clear_line(tiny_root, tmp_path):
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    reference = TripletDataset(FashionIQ(root), "train").triplets[0].reference
    (root / "images" / f"{reference}.jpg").write_bytes(b"\xff\xd8\xff truncated")
    result = subprocess.run([sys.executable, "-m", "clip4cir", "train", "--data", str(root),
                             "--output", str(tmp_path / "out"), "--model", "cir-tiny", "--batch-size", "8",
                             "--workers", "1", "--quiet", "--epochs", "1"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and f"{reference}.jpg" in lines[-1]
    assert "Traceback" not in result.stderr and "Original" not in result.stderr
