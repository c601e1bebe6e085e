"""The GPU paths: they run on machines with a GPU (faiss-gpu, CUDA) and are skipped, with the reason, elsewhere."""
import faiss
import numpy as np
import pytest
import torch

from clip4cir.retrieval.index import CatalogIndex, Item
from clip4cir.retrieval.vector_store import gpus

needs_faiss_gpu = pytest.mark.skipif(not (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0),
                                     reason="faiss sees no GPU (install faiss-gpu on a GPU machine)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_faiss_gpu
@pytest.mark.parametrize("kind", ["flat", "ivf-sq8", "ivf-pq"])
def test_gpu_index_matches_cpu_reference(kind, tmp_path):
    """With faiss-gpu the flat and IVF kinds search on the GPU (unfiltered) and agree with exact search."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 64)).astype(np.float32)
    index = CatalogIndex.create(tmp_path / "idx", [Item(str(i), "", ("a" if i % 2 else "b",)) for i in range(len(x))],
                                x, kind=kind, target_recall=0.95)
    assert gpus() > 0
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    original = np.array([int(index.item_at(r).id) for r in range(len(x))])
    truth = np.argsort(-(xn[:50] @ xn.T), axis=1)[:, :10]
    _, rows = index.search(x[:50], 10)
    if kind != "flat":
        assert index.store._gpu_index is not None and index.store._gpu_index is not index.store.index
    recall = np.mean([len(set(original[a]) & set(b)) / 10 for a, b in zip(rows, truth, strict=True)])
    assert recall >= (0.999 if kind == "flat" else 0.9)
    index.remove(["0", "1"])
    index.save(tmp_path / "idx2")
    assert len(CatalogIndex.load(tmp_path / "idx2")) == 19998


@needs_cuda
def test_amp_training_step_on_cuda(tiny_root):
    from clip4cir.data.datasets import TripletDataset
    from clip4cir.data.sources.fashioniq import FashionIQ
    from clip4cir.models.factory import create_model
    from clip4cir.training.stage_one import TowerFeatures, set_trainable, training_step
    from clip4cir.training.trainer import amp_settings
    encoder = create_model("cir-tiny", device="cuda")
    dtype, scaler_needed = amp_settings(torch.device("cuda"))
    assert dtype in (torch.bfloat16, torch.float16) and scaler_needed == (dtype == torch.float16)
    ds = TripletDataset(FashionIQ(tiny_root), "train", transform=encoder.transform)
    items = [ds[i] for i in range(8)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("reference", "target")}
    optimizer = torch.optim.AdamW(set_trainable(encoder.model, "both"), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=scaler_needed)
    losses = []
    for _ in range(3):
        loss = training_step(TowerFeatures(encoder, "both"), encoder, batch, [it["caption"] for it in items], dtype)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
