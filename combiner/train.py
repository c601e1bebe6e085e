"""Stage two (``scripts/train_combiner.py``): train the Combiner on features of frozen CLIP encoders.

The encoders are frozen, so their features are computed once and cached (``combiner.feature_cache``); epochs
then run on the cached tensors. ``--reencode`` instead encodes every batch as the reference implementation does
(for comparison: same data order, captions and loss).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader

from clip4cir.captions import random_caption_variant
from clip4cir.checkpointing import open_run
from clip4cir.cli import MAX_WIDTH, add_model_args, add_run_args, check_run_args, run, whole
from clip4cir.data import TripletDataset
from clip4cir.device import autocast, eval_mode
from clip4cir.distributed import Dist, barrier, mean_over_ranks, run_distributed
from clip4cir.encoder import CLIPEncoder
from clip4cir.evaluation import choose_blend, evaluate
from clip4cir.factory import load_model
from clip4cir.features import loader_options
from clip4cir.fusion import Combiner, load_combiner, save_combiner
from clip4cir.loop import EpochSampler, new_state, run_epochs
from clip4cir.sources import source_from_args
from clip4cir.losses import Temperature, contrastive_loss
from clip4cir.recipes import add_recipe_args, apply_recipe
from clip4cir.train import amp_settings, average_gradient, batch_groups, check_batch_fits

from .feature_cache import TripletFeatures, triplet_features


def cached_batch(features: TripletFeatures, indices: torch.Tensor, seed: int, epoch: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reference image, caption text, target image) features of a batch of triplets, from the cache."""
    counts = (features.offsets[1:] - features.offsets[:-1])[indices]
    variants = torch.tensor([random_caption_variant(seed, epoch, i, int(n)) for i, n in zip(indices.tolist(), counts)])
    return (features.image[features.reference[indices]], features.text[features.offsets[indices] + variants],
            features.image[features.target[indices]])


@torch.no_grad()
def encoded_batch(encoder: CLIPEncoder, batch: dict, captions: list[str]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same features, encoded now from the batch's images and captions (the reference's way)."""
    images = torch.cat([batch["reference"], batch["target"]]).to(encoder.device, non_blocking=True)
    reference, target = encoder.encode_image(images).float().chunk(2)
    return reference, encoder.encode_text(captions).float(), target


class CombinedQuery(nn.Module):
    """(reference image features, text features) → the Combiner's query: the module DistributedDataParallel wraps."""

    def __init__(self, combiner: Combiner):
        super().__init__()
        self.combiner = combiner

    def forward(self, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.combiner.combine_features(reference, text)


def combiner_loss(query_model: nn.Module, reference: torch.Tensor, text: torch.Tensor, target: torch.Tensor,
                  amp_dtype: torch.dtype | None, **loss_options) -> torch.Tensor:
    """Contrastive loss of the combined query against the (global) batch's targets, or against a bank of
    negatives (see clip4cir.losses.contrastive_loss for the options)."""
    device = next(query_model.parameters()).device
    with autocast(device, amp_dtype):
        query = query_model(reference.to(device), text.to(device))
    return contrastive_loss(query, target.to(device), **loss_options)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_combiner.py", description=__doc__)
    add_run_args(parser, epochs=300, batch_size=1024, lr=2e-5)
    add_model_args(parser)
    parser.add_argument("--proj-dim", type=whole(1, MAX_WIDTH), default=None,
                        help="projection dim P (default 4 × feature dim)")
    parser.add_argument("--hidden-dim", type=whole(1, MAX_WIDTH), default=None,
                        help="hidden dim H (default 8 × feature dim)")
    parser.add_argument("--cache-dir", help="feature cache (default: OUTPUT/feature_cache)")
    parser.add_argument("--reencode", action="store_true", help="encode every batch instead of caching features")
    add_recipe_args(parser, stage=2)
    args = parser.parse_args(argv)
    apply_recipe(args, stage=2)
    if not args.model and not args.clip_checkpoint:
        raise ValueError("give the frozen encoders: --model NAME [--pretrained TAG] or --clip-checkpoint PATH")
    if args.reencode and args.gallery_negatives:
        raise ValueError("--gallery-negatives needs cached features: leave out --reencode or --gallery-negatives")
    check_run_args(args)
    args.cache_dir = args.cache_dir or str(Path(args.output) / "feature_cache")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_distributed(train, parse_args(argv))


def train(args: argparse.Namespace, ddp: Dist, device: torch.device) -> int:
    source = source_from_args(args)
    run_dir, params = open_run(args, ddp.world_size)
    encoder = load_model(args.model, args.pretrained, args.clip_checkpoint, args.seed, device=device)
    encoder.model.eval().requires_grad_(False)
    train_set = TripletDataset(source, "train", transform=encoder.transform, randomize_captions=True, seed=args.seed,
                               skip_empty_captions=True)
    check_batch_fits(args.batch_size, ddp.world_size, len(train_set))
    data = {"train": train_set.record(), "skipped_empty_captions": train_set.empty_captions}
    if args.resume:
        run_dir.check_same_data(data)  # (a run stopped before its first checkpoint starts again from step 0)

    checkpoint = run_dir.latest_checkpoint() if args.resume else None
    if checkpoint is not None:
        combiner = load_combiner(checkpoint / "model.safetensors", device, encoder)[0]
    else:
        torch.manual_seed(args.seed)  # the same initial Combiner on every rank
        combiner = Combiner(encoder.dim, args.proj_dim, args.hidden_dim).to(device)
    query_model: nn.Module = CombinedQuery(combiner)
    if ddp.enabled:
        query_model = DistributedDataParallel(query_model, device_ids=[device.index] if device.type == "cuda" else None)
    temperature = Temperature(args.learn_temperature).to(device)
    optimizer = torch.optim.Adam(list(combiner.parameters()) + ([temperature.log_scale] if args.learn_temperature
                                                                else []), lr=args.lr)
    amp_dtype, use_scaler = amp_settings(device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    if checkpoint is not None:
        state = run_dir.resume(checkpoint, optimizer, scaler, ddp.rank, ddp.is_main)
        temperature.log_scale.data.fill_(state.get("log_scale", temperature.log_scale.item()))
    else:
        state = new_state()
        if ddp.is_main:
            run_dir.start({**params, "training_data": data})
    if ddp.is_main and train_set.empty_captions:
        print(f"training on {len(train_set):,} triplets; skipped {train_set.empty_captions:,} with an empty caption")

    sampler = EpochSampler(len(train_set), args.batch_size, args.seed, ddp.rank, ddp.world_size,
                           batch_groups(train_set, args.hard_negatives))
    if args.reencode:
        batches = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                             **loader_options(args.workers, device, args.seed))
    else:
        started = time.perf_counter()
        if ddp.is_main:  # the main rank fills the cache, the others then read it
            features, hit = triplet_features(encoder, train_set, args.cache_dir, workers=args.workers,
                                             progress=not args.quiet)
        barrier()
        if not ddp.is_main:
            features, hit = triplet_features(encoder, train_set, args.cache_dir, progress=False)
        if ddp.is_main:
            print(f"training features: {'cache hit' if hit else 'computed and cached'} in "
                  f"{time.perf_counter() - started:.1f}s ({len(features):,} triplets, "
                  f"{len(features.image_ids):,} images)")
        batches = BatchSampler(sampler, args.batch_size, drop_last=True)
    if checkpoint is None:
        torch.manual_seed(args.seed + ddp.rank)  # dropout masks differ between ranks; the same warm or cold cache

    def step(batch, epoch: int) -> tuple[float, int]:
        if args.reencode:
            captions = [train_set.caption(i) for i in batch["index"].tolist()]
            reference, text, target = encoded_batch(encoder, batch, captions)
        else:
            reference, text, target = cached_batch(features, torch.tensor(batch), args.seed, epoch)
        bank = {"bank": features.image, "bank_targets": features.target[torch.tensor(batch)]} \
            if args.gallery_negatives else {}
        loss = combiner_loss(query_model, reference, text, target, amp_dtype, scale=temperature(),
                             symmetric=args.symmetric, label_smoothing=args.label_smoothing, **bank)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.learn_temperature:
            average_gradient(temperature.log_scale)
        scaler.step(optimizer)
        scaler.update()
        state["log_scale"] = temperature.log_scale.item()
        return mean_over_ranks(loss.item()), len(reference) * ddp.world_size

    def start_epoch(epoch: int) -> None:
        train_set.set_epoch(epoch)
        combiner.train()

    def validate() -> dict:
        with eval_mode(combiner):
            if not args.blend:
                return evaluate(encoder, source, combine=combiner.combine, cache_dir=args.cache_dir,
                                workers=args.workers, progress=not args.quiet)
            combiner.blend, metrics = choose_blend(encoder, source, combiner, cache_dir=args.cache_dir,
                                                   workers=args.workers, progress=not args.quiet)
            return {**metrics, "blend": combiner.blend}

    def write_model(path, metrics) -> None:
        save_combiner(combiner, path, encoder.record(), {"epoch": state["epoch"], "global_step": state["global_step"],
                                                         "metrics": metrics, "stage": "combiner"}, data)

    run_epochs(run_dir, state, epochs=args.epochs, sampler=sampler, batches=batches, step=step, validate=validate,
               val_every=args.val_every, write_model=write_model, parameters=combiner.parameters,
               optimizer=optimizer, scaler=scaler, save_best=args.save_best, start_epoch=start_epoch,
               max_steps=args.max_steps, save_every=args.save_every, progress=not args.quiet, is_main=ddp.is_main)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
