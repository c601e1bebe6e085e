"""Learning image similarity from labels (``scripts/train_labels.py``): fine-tune an image encoder (an open_clip
image tower, or a timm backbone with a projection head, ``--model timm/resnet50``) so that images of one label
(a person, a product) are near and others far, with a pytorch-metric-learning loss (clip4cir.metric_learning)
on batches of m images of each label. Validated with MAP@R on held-out labels; the same run folder, checkpoints
and exact resume as both composed-retrieval stages, and an encoder file the index, search and app load.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .checkpointing import open_run
from .cli import (MAX_WIDTH, POSITIVE, add_model_args, add_run_args, check_run_values, number, run,
                  whole)
from .data import GalleryDataset
from .device import autocast
from .distributed import Dist, mean_over_ranks, run_distributed
from .encoder import Encoder
from .encoder_file import load_encoder, save_encoder
from .errors import DataError
from .factory import load_model
from .fingerprints import digest
from .features import extract_image_features, loader_options
from .loop import new_state, run_epochs
from .metric_learning import (LOSSES, ClassBatchSampler, attribute_agreement, labelled_loss, make_loss,
                              retrieval_metrics)
from .sources import source_from_args
from .sources.base import check_images_readable
from .sources.labels import LabelledImages
from .train import amp_settings, set_train_mode, set_trainable


class LabelledImageDataset(Dataset):
    """A split's images with their label numbers: items ``{"index", "image", "label"}``."""

    def __init__(self, source: LabelledImages, split: str, transform):
        numbers = source.label_numbers(split)
        self.source, self.transform, self.ids = source, transform, list(numbers)
        self.labels = list(numbers.values())
        self.num_labels = len(set(self.labels))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "image": self.transform(self.source.load_image(self.ids[index])),
                "label": self.labels[index]}


def label_metrics(encoder: Encoder, source: LabelledImages, split: str, batch_size: int = 64, workers: int = 0,
                  progress: bool = True, attributes: bool = False) -> dict[str, float]:
    """Retrieval metrics of a split's images among themselves, labels as relevance (Recall@K, MAP@R,
    R-precision); with ``attributes``, also the top-10 attribute agreement where the source has attributes."""
    gallery = GalleryDataset(source, split, transform=encoder.transform)
    ids, features = extract_image_features(encoder, gallery, batch_size, workers, progress, desc=f"{split} images")
    numbers = source.label_numbers(split)
    metrics = retrieval_metrics(features, torch.tensor([numbers[i] for i in ids]))
    if attributes and source.attributes:
        metrics["attributes@10"] = attribute_agreement(features, torch.tensor(
            np.stack([source.attributes[i] for i in ids])), k=10)
    return metrics


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_labels.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser, epochs=30, batch_size=64, lr=1e-4)
    add_model_args(parser)
    parser.add_argument("--loss", choices=LOSSES, default="triplet",
                        help="the metric-learning loss (the default measured best: see the README's table)")
    parser.add_argument("--m-per-class", type=whole(2), default=4, help="images of each label in a batch")
    parser.add_argument("--embed-dim", type=whole(1, MAX_WIDTH), default=128, help="timm encoders: the projection's size")
    parser.add_argument("--weight-decay", type=number(0, 1e3), default=1e-4)
    parser.add_argument("--proxy-lr-factor", type=POSITIVE, default=100.0,
                        help="proxy-based losses: the proxies' learning rate is this times --lr")
    args = parser.parse_args(argv)
    if args.dataset == "auto":
        args.dataset = "labels"
    check_run_values(args)
    if not (args.model or args.clip_checkpoint):
        raise ValueError("give the encoder: --model NAME (an open_clip model or timm/<model>) or --clip-checkpoint")
    source = source_from_args(args)
    if not isinstance(source, LabelledImages):
        raise DataError(f"--data {args.data} is not a set of labelled images (a folder per label, or image,label "
                        f"rows): it is {source.describe()}")
    check_images_readable(source, [i for split in source.splits() for i in source.gallery(split)])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_distributed(train, parse_args(argv))


def train(args: argparse.Namespace, ddp: Dist, device: torch.device) -> int:
    source = source_from_args(args)
    run_dir, params = open_run(args, ddp.world_size)
    checkpoint = run_dir.latest_checkpoint() if args.resume else None
    encoder = load_encoder(checkpoint / "model.safetensors", device) if checkpoint is not None else \
        load_model(args.model, args.pretrained, args.clip_checkpoint, args.seed, "squarepad", device=device,
                   embed_dim=args.embed_dim)
    train_set = LabelledImageDataset(source, "train", encoder.transform)
    parts = source.fingerprint_parts("train")
    data = {"train": {"source": source.record(), "images": len(train_set), "labels": train_set.num_labels,
                      "fingerprint": digest(parts), "parts": parts}, "skipped_labels": source.skipped_labels}
    if args.resume:
        run_dir.check_same_data(data)
    model = encoder.model
    trainable = set_trainable(model, "image") if encoder.has_text else list(model.parameters())
    for p in trainable:
        p.requires_grad_(True)
    loss_fn, miner = make_loss(args.loss, train_set.num_labels, encoder.dim)
    loss_fn = loss_fn.to(device)
    image_model: nn.Module = ImageFeatures(encoder)
    if ddp.enabled:
        image_model = DistributedDataParallel(image_model, device_ids=[device.index] if device.type == "cuda" else None)
    groups = [{"params": trainable}]
    if list(loss_fn.parameters()):
        groups.append({"params": list(loss_fn.parameters()), "lr": args.lr * args.proxy_lr_factor, "weight_decay": 0})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    dtype, use_scaler = amp_settings(device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    if checkpoint is not None:
        state = run_dir.resume(checkpoint, optimizer, scaler, ddp.rank, ddp.is_main)
        loss_fn.load_state_dict(state["loss_state"])
    else:
        state = new_state()
        if ddp.is_main:
            run_dir.start({**params, "training_data": data})
        torch.manual_seed(args.seed + ddp.rank)
    sampler = ClassBatchSampler(train_set.labels, args.m_per_class, args.batch_size, args.seed, ddp.rank,
                                ddp.world_size)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        **loader_options(args.workers, device, args.seed))

    def write_model(path, metrics) -> None:
        save_encoder(encoder, path, {"epoch": state["epoch"], "global_step": state["global_step"], "metrics": metrics,
                                     "stage": "labels", "loss": args.loss, "data": data})

    def start_epoch(epoch: int) -> None:
        if encoder.has_text:
            set_train_mode(model, "image")
        else:
            model.train()

    def step(batch: dict, epoch: int) -> tuple[float, int]:
        images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device)
        with autocast(device, dtype):
            embeddings = image_model(images)
        loss = labelled_loss(loss_fn, miner, embeddings, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        encoder.invalidate_fingerprint()
        state["loss_state"] = loss_fn.state_dict()
        return mean_over_ranks(loss.item()), len(labels) * ddp.world_size

    def validate() -> dict:
        model.eval()
        metrics = label_metrics(encoder, source, "val", workers=args.workers, progress=not args.quiet)
        return {"average": metrics, "score": metrics["MAP@R"]}

    run_epochs(run_dir, state, epochs=args.epochs, sampler=sampler, batches=loader, step=step, validate=validate,
               val_every=args.val_every, write_model=write_model, parameters=model.parameters, optimizer=optimizer,
               scaler=scaler, save_best=args.save_best, start_epoch=start_epoch, max_steps=args.max_steps,
               save_every=args.save_every, progress=not args.quiet, is_main=ddp.is_main)
    return 0


class ImageFeatures(nn.Module):
    """images → image features: the module DistributedDataParallel wraps."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.model, self.encoder = encoder.model, encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(images)


if __name__ == "__main__":
    raise SystemExit(run(main))
