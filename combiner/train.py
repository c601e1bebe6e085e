"""Stage two (``scripts/train_combiner.py``): train the Combiner on features of frozen CLIP encoders.

The encoders are frozen, so their features are computed once and cached (``combiner.feature_cache``); epochs
then run on the cached tensors. ``--reencode`` instead encodes every batch as the reference implementation does
(for comparison: same data order, captions and loss).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader

from clip4cir.checkpointing import RunDir, set_rng_state
from clip4cir.cli import add_model_args, encoder_from_args, run
from clip4cir.data import CATEGORIES, DataError, TripletDataset, load_triplets, parse_categories, random_caption_variant
from clip4cir.evaluation import rank_category, summarize
from clip4cir.features import loader_options
from clip4cir.loop import EpochSampler, new_state, run_epochs
from clip4cir.models import CLIPEncoder, resolve_device
from clip4cir.train import amp_settings, contrastive_loss

from .feature_cache import TripletFeatures, triplet_features
from .model import Combiner, load_combiner, save_combiner


def cached_batch(features: TripletFeatures, indices: torch.Tensor, seed: int, epoch: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reference image, caption text, target image) features of a batch of triplets, from the cache."""
    variants = torch.tensor([random_caption_variant(seed, epoch, i) for i in indices.tolist()])
    return (features.image[features.reference[indices]], features.text[indices, variants],
            features.image[features.target[indices]])


@torch.no_grad()
def encoded_batch(encoder: CLIPEncoder, batch: dict, captions: list[str]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same features, encoded now from the batch's images and captions (the reference's way)."""
    images = torch.cat([batch["reference"], batch["target"]]).to(encoder.device, non_blocking=True)
    reference, target = encoder.encode_image(images).float().chunk(2)
    return reference, encoder.encode_text(captions).float(), target


def combiner_loss(combiner: Combiner, reference: torch.Tensor, text: torch.Tensor, target: torch.Tensor,
                  amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Contrastive loss of the combined query against the batch's targets."""
    device = next(combiner.parameters()).device
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        query = combiner.combine_features(reference.to(device), text.to(device))
    return contrastive_loss(query, target.to(device))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_combiner.py", description=__doc__)
    parser.add_argument("--data", required=True, help="FashionIQ-layout root")
    add_model_args(parser)
    parser.add_argument("--output", required=True, help="run folder: params.json, metrics.jsonl, checkpoints")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--proj-dim", type=int, default=None, help="projection dim P (default 4 × feature dim)")
    parser.add_argument("--hidden-dim", type=int, default=None, help="hidden dim H (default 8 × feature dim)")
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--val-every", type=int, default=1)
    parser.add_argument("--save-best", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--max-steps", type=int, default=0, help="stop (resumably) after this many steps in all")
    parser.add_argument("--cache-dir", help="feature cache (default: OUTPUT/feature_cache)")
    parser.add_argument("--reencode", action="store_true", help="encode every batch instead of caching features")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "val_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not args.model and not args.clip_checkpoint:
        raise ValueError("give the frozen encoders: --model NAME [--pretrained TAG] or --clip-checkpoint PATH")
    args.categories = ",".join(parse_categories(args.categories))
    args.cache_dir = args.cache_dir or str(Path(args.output) / "feature_cache")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    categories = args.categories.split(",")
    run_dir = RunDir(args.output)
    params = {k: v for k, v in vars(args).items() if k not in ("resume", "quiet", "max_steps")}
    run_dir.check_new_or_resumable(params, args.resume)
    if not os.path.isdir(args.data):
        raise DataError(f"--data {args.data} does not exist")
    for category in categories:
        load_triplets(args.data, category, "val")
    encoder = encoder_from_args(args)
    encoder.model.eval().requires_grad_(False)
    train_set = TripletDataset(args.data, "train", categories, transform=encoder.transform,
                               randomize_captions=True, seed=args.seed)
    if args.batch_size > len(train_set):
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_set):,} training triplets")

    if args.resume:
        combiner, meta = load_combiner(run_dir.file("last.safetensors"), device)
        if meta["encoder"].get("fingerprint") != encoder.fingerprint():
            raise DataError(f"--resume: the encoder differs from the one {run_dir.path} was trained on")
    else:
        torch.manual_seed(args.seed)
        combiner = Combiner(encoder.dim, args.proj_dim, args.hidden_dim).to(device)
    optimizer = torch.optim.Adam(combiner.parameters(), lr=args.lr)
    amp_dtype, use_scaler = amp_settings(device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    state = new_state()
    if args.resume:
        saved = run_dir.load_state()
        if meta["info"].get("global_step") != saved["global_step"]:
            raise DataError(f"{run_dir.file('last.safetensors')} (step {meta['info'].get('global_step')}) does not "
                            f"match {run_dir.state_file} (step {saved['global_step']})")
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state = {k: saved[k] for k in state}
        set_rng_state(saved["rng"])
        run_dir.truncate_metrics(state["epoch"])
    else:
        run_dir.start(params)

    sampler = EpochSampler(len(train_set), args.batch_size, args.seed)
    if args.reencode:
        batches = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                             **loader_options(args.workers, device))
    else:
        started = time.perf_counter()
        features, hit = triplet_features(encoder, train_set, args.cache_dir, workers=args.workers,
                                         progress=not args.quiet)
        print(f"training features: {'cache hit' if hit else 'computed and cached'} in "
              f"{time.perf_counter() - started:.1f}s ({len(features):,} triplets, {len(features.image_ids):,} images)")
        batches = BatchSampler(sampler, args.batch_size, drop_last=True)

    def step(batch, epoch: int) -> tuple[float, int]:
        if args.reencode:
            captions = [train_set.caption(i) for i in batch["index"].tolist()]
            reference, text, target = encoded_batch(encoder, batch, captions)
        else:
            reference, text, target = cached_batch(features, torch.tensor(batch), args.seed, epoch)
        loss = combiner_loss(combiner, reference, text, target, amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item(), len(reference)

    def start_epoch(epoch: int) -> None:
        train_set.set_epoch(epoch)
        combiner.train()

    def validate() -> dict:
        return summarize([rank_category(encoder, args.data, c, combiner.combine, "val", args.cache_dir,
                                        workers=args.workers, progress=not args.quiet) for c in categories])

    def info(metrics) -> dict:
        return {"epoch": state["epoch"], "global_step": state["global_step"], "metrics": metrics,
                "stage": "combiner"}

    def save(metrics: dict | None) -> None:
        save_combiner(combiner, run_dir.file("last.safetensors"), encoder.record(), info(metrics))
        run_dir.save_state({**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})

    def save_best(record: dict) -> None:
        save_combiner(combiner, run_dir.file("best.safetensors"), encoder.record(), info(record))

    run_epochs(run_dir, state, epochs=args.epochs, sampler=sampler, batches=batches, step=step, validate=validate,
               val_every=args.val_every, save=save, save_best=save_best if args.save_best else None,
               start_epoch=start_epoch, max_steps=args.max_steps, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
