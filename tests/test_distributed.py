"""torchrun on the CPU (gloo, 2 processes): global-batch equivalence, rank-0 writes, resume, failures."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from clip4cir.core.distributed import init_distributed, mean_over_ranks, shutdown
from clip4cir.core.ports import free_port
from clip4cir.data.datasets import TripletDataset
from clip4cir.data.sources.fashioniq import FashionIQ, load_triplets
from clip4cir.models.encoder_file import load_encoder, save_encoder
from clip4cir.models.factory import create_model
from clip4cir.training.checkpointing import RunDir, read_metrics
from clip4cir.training.samplers import EpochSampler
from clip4cir.training.stage_one import TowerFeatures, set_train_mode, set_trainable, training_step

pytestmark = pytest.mark.slow



def launch(subcommand: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "clip4cir", subcommand]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.run(command + args, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def single(subcommand: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clip4cir", subcommand] + args, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def common(root, out):
    return ["--data", str(root), "--model", "cir-tiny", "--output", str(out), "--workers", "0", "--quiet",
            "--lr", "1e-4", "--device", "cpu"]


def test_sampler_shards_global_batches():
    one = list(EpochSampler(20, 6, seed=3))
    ranks = [list(EpochSampler(20, 3, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == 18 and all(len(r) == 9 for r in ranks)
    for b in range(3):  # each global batch of the 2 ranks is the single process's batch
        assert sorted(ranks[0][3 * b:3 * b + 3] + ranks[1][3 * b:3 * b + 3]) == sorted(one[6 * b:6 * b + 6])


def _gradients(rank: int, world: int, port: int, root: str, out: str) -> None:
    """One training step's loss and (DDP-averaged) gradients at per-rank batch 8 / world."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    ddp, device = init_distributed(torch.device("cpu"))
    encoder = create_model("cir-tiny")
    set_trainable(encoder.model, "both")
    set_train_mode(encoder.model, "both")
    features = TowerFeatures(encoder, "both")
    if ddp.enabled:
        features = DistributedDataParallel(features)
    dataset = TripletDataset(FashionIQ(root), "train", transform=encoder.transform)
    per_rank = 8 // world
    indices = list(EpochSampler(len(dataset), per_rank, seed=0, rank=rank, world_size=world))[:per_rank]
    items = [dataset[i] for i in indices]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("reference", "target")}
    loss = training_step(features, encoder, batch, [it["caption"] for it in items], None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in encoder.model.named_parameters() if p.grad is not None}
    mean_loss = mean_over_ranks(loss.item())
    if rank == 0:
        torch.save({"loss": mean_loss, "grads": grads}, out)
    shutdown()


def test_ddp_gradients_equal_single_process_gradients(tiny_root, tmp_path):
    import torch.multiprocessing as mp
    for world in (1, 2):
        mp.spawn(_gradients, args=(world, free_port(), str(tiny_root), str(tmp_path / f"w{world}.pt")), nprocs=world)
    one, two = (torch.load(tmp_path / f"w{w}.pt") for w in (1, 2))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    for name, g in one["grads"].items():  # per tensor, relative to its norm (float sums differ in order)
        assert (two["grads"][name] - g).norm() <= 1e-5 * g.norm() + 1e-9, name


def test_two_processes_at_batch_b_equal_one_at_2b(tiny_root, tmp_path):
    two = launch("train", common(tiny_root, tmp_path / "two") + ["--batch-size", "4", "--max-steps", "1"])
    assert two.returncode == 0, two.stderr[-3000:]
    one = single("train", common(tiny_root, tmp_path / "one") + ["--batch-size", "8", "--max-steps", "1"])
    assert one.returncode == 0, one.stderr[-3000:]
    last = {n: RunDir(tmp_path / n).latest_checkpoint() for n in ("one", "two")}
    state = {n: torch.load(last[n] / "state.pt", weights_only=False) for n in ("one", "two")}
    assert state["two"]["loss_sum"] == pytest.approx(state["one"]["loss_sum"], rel=1e-5)
    assert len(state["two"]["rng"]) == 2 and len(state["one"]["rng"]) == 1
    a = load_encoder(last["one"] / "model.safetensors").model.state_dict()
    b = load_encoder(last["two"] / "model.safetensors").model.state_dict()
    # AdamW's first step is lr·g/(|g|+eps): where the true gradient is zero (attention key biases) or tiny, float
    # noise in g moves a weight by up to lr either way, so the two runs differ there by at most 2·lr; everywhere
    # else the weights agree to float precision (0.2·lr held on one machine and not on another: noise, not a bug).
    # (test_ddp_gradients_equal_single_process_gradients checks the gradients themselves, tightly.)
    close = sum(int(torch.isclose(b[k], a[k], rtol=1e-5, atol=2e-6).sum()) for k in a)
    assert close / sum(v.numel() for v in a.values()) > 0.999
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2 * 1e-4, msg=key)
    # only rank 0 wrote: one params file, no per-rank leftovers
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoints", "metrics.jsonl", "params.json"]
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-000000001"]
    assert json.loads((tmp_path / "two" / "params.json").read_text())["world_size"] == 2


def test_resume_under_torchrun_and_stage_two(tiny_root, tmp_path):
    args = ["--batch-size", "4", "--epochs", "2", "--val-every", "2"]
    full = launch("train", common(tiny_root, tmp_path / "full") + args)
    assert full.returncode == 0, full.stderr[-3000:]
    part = launch("train", common(tiny_root, tmp_path / "part") + args + ["--max-steps", "5"])
    assert part.returncode == 0, part.stderr[-3000:]
    resumed = launch("train", common(tiny_root, tmp_path / "part") + args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logs = [read_metrics(tmp_path / n / "metrics.jsonl") for n in ("full", "part")]
    assert [r["epoch"] for r in logs[0]] == [0, 1] and len(logs[1]) == 2
    assert logs[1][-1]["loss"] == pytest.approx(logs[0][-1]["loss"], rel=1e-5)
    assert logs[1][-1]["average"] == pytest.approx(logs[0][-1]["average"])
    combiner = launch("train-combiner", ["--data", str(tiny_root), "--clip-checkpoint",
                                            str(RunDir(tmp_path / "full").latest_checkpoint() / "model.safetensors"),
                                            "--output",
                                            str(tmp_path / "comb"), "--batch-size", "4", "--epochs", "2",
                                            "--workers", "0", "--quiet", "--lr", "1e-3", "--device", "cpu"])
    assert combiner.returncode == 0, combiner.stderr[-3000:]
    log = read_metrics(tmp_path / "comb" / "metrics.jsonl")
    assert len(log) == 2 and log[-1]["loss"] < log[0]["loss"] * 1.5 and "average" in log[-1]


def corrupt_inside() -> bytes:
    """An image whose header and end marker are whole (the check before training passes it) but whose pixel data
    is not: it fails only when a rank decodes it."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = data.find(b"IDAT") + 8
    data[start + 10:start + 400] = bytes(b ^ 0x5A for b in data[start + 10:start + 400])
    return bytes(data)


def test_world_size_larger_than_data_and_a_crashing_rank(tiny_root, tmp_path):
    n = sum(len(load_triplets(tiny_root, c, "train")) for c in ("dress", "shirt", "toptee"))
    too_big = launch("train", common(tiny_root, tmp_path / "big") + ["--batch-size", str(n // 2 + 1)])
    assert too_big.returncode != 0 and "× 2 processes" in too_big.stderr
    root = tmp_path / "fiq"
    shutil.copytree(tiny_root, root)
    ok = launch("train", common(root, tmp_path / "run") + ["--batch-size", "4", "--epochs", "1"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    last = RunDir(tmp_path / "run").latest_checkpoint()
    good = (last / "model.safetensors").read_bytes()
    for t in load_triplets(root, "dress", "train"):  # every dress reference: some rank reads one in epoch 1
        (root / "images" / f"{t.reference}.jpg").write_bytes(corrupt_inside())
    refused = launch("train", common(root, tmp_path / "run") + ["--batch-size", "4", "--epochs", "2",
                                                                         "--resume"])
    assert refused.returncode != 0 and "the training data changed" in refused.stderr
    crashed = launch("train", common(root, tmp_path / "new") + ["--batch-size", "4", "--epochs", "1"])
    assert crashed.returncode != 0 and "unrecognized data stream" in crashed.stderr
    assert RunDir(tmp_path / "run").latest_checkpoint() == last and (last / "model.safetensors").read_bytes() == good
    assert load_encoder(last / "model.safetensors").info["epoch"] == 1


def test_build_index_under_torchrun_equals_one_process(tiny_root, tmp_path):
    """Two processes each encode their share of the chunks; the first assembles the same index one process
    builds."""
    from clip4cir.retrieval.index import CatalogIndex
    encoder = tmp_path / "enc.safetensors"
    save_encoder(create_model("cir-tiny"), encoder)
    args = ["--data", str(tiny_root), "--clip-checkpoint", str(encoder), "--workers", "0", "--quiet", "--device", "cpu",
            "--splits", "train,val", "--chunk-size", "32"]  # 6 chunks: 3 for each process
    two = launch("index", args + ["--output", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    one = single("index", args + ["--output", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = CatalogIndex.load(tmp_path / "one"), CatalogIndex.load(tmp_path / "two")
    assert a.ids() == b.ids() and len(a) == 162
    for item_id in a.ids()[::20]:
        torch.testing.assert_close(torch.from_numpy(b.feature(item_id)), torch.from_numpy(a.feature(item_id)),
                                   rtol=1e-4, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
