"""Stage one (``scripts/train_clip.py``): task-oriented fine-tuning of the CLIP image and/or text encoder.

Query = normalise(image feature of the reference + text feature of the caption), target = normalise(image
feature of the target), logits = 100 · query · targetᵀ over the batch, cross-entropy against the diagonal
(``--recipe clip4cir``); the recipe's components (clip4cir.recipes) change the loss and the batches.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .checkpointing import open_run
from .cli import add_model_args, add_run_args, check_run_args, number, run
from .data import TripletDataset
from .device import amp_dtype, autocast
from .distributed import Dist, mean_over_ranks, run_distributed
from .encoder import CLIPEncoder
from .encoder_file import load_encoder, save_encoder
from .evaluation import evaluate
from .factory import load_model
from .features import loader_options
from .loop import EpochSampler, new_state, run_epochs
from .losses import LOGIT_SCALE, Temperature, contrastive_loss
from .recipes import add_recipe_args, apply_recipe
from .sources import source_from_args

ENCODER_CHOICES = ("both", "image", "text")


def set_trainable(model: nn.Module, encoder: str) -> list[nn.Parameter]:
    """Unfreeze the towers ``encoder`` names (both/image/text), freeze the rest; returns the trainable params."""
    if encoder not in ENCODER_CHOICES:
        raise ValueError(f"--encoder must be one of {', '.join(ENCODER_CHOICES)}, got {encoder!r}")
    trainable = []
    for name, p in model.named_parameters():
        visual = name.startswith("visual.")
        text = not visual and not name.startswith("logit_")  # the fixed scale of 100 replaces logit_scale
        p.requires_grad_((visual and encoder in ("both", "image")) or (text and encoder in ("both", "text")))
        if p.requires_grad:
            trainable.append(p)
    return trainable


def set_train_mode(model: nn.Module, encoder: str) -> None:
    """Train mode for the trained towers; frozen towers and every BatchNorm layer stay in eval mode."""
    model.train()
    if encoder == "text":
        model.visual.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def amp_settings(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, use a grad scaler): bf16 where supported, else fp16 with a scaler on CUDA; fp32 on CPU."""
    dtype = amp_dtype(device)
    return dtype, dtype == torch.float16


class TowerFeatures(nn.Module):
    """(images, tokens) → (image features, text features), with gradients only through the trained towers:
    the module DistributedDataParallel wraps."""

    def __init__(self, encoder: CLIPEncoder, towers: str):
        super().__init__()
        self.model, self.encoder, self.towers = encoder.model, encoder, towers

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.towers != "text"):
            image_features = self.encoder.encode_image(images)
        with torch.set_grad_enabled(grad and self.towers != "image"):
            text_features = self.encoder.encode_text(tokens)
        return image_features, text_features


def training_step(features: nn.Module, encoder: CLIPEncoder, batch: dict, captions: list[str],
                  dtype: torch.dtype | None, scale: float | torch.Tensor = LOGIT_SCALE, symmetric: bool = False,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss of one batch; ``features`` is a TowerFeatures, wrapped in DistributedDataParallel under torchrun."""
    device = encoder.device
    images = torch.cat([batch["reference"], batch["target"]]).to(device, non_blocking=True)
    tokens = encoder.tokenize(captions).to(device)
    with autocast(device, dtype):
        image_features, text_features = features(images, tokens)
    reference, target = image_features.float().chunk(2)
    return contrastive_loss(reference + text_features.float(), target, scale, symmetric, label_smoothing)


def batch_groups(train_set: TripletDataset, hard_negatives: bool) -> list | None:
    """The category of each training triplet, for batches of one category (None: random batches)."""
    categories = [t.category for t in train_set.triplets]
    return categories if hard_negatives and all(categories) and len(set(categories)) > 1 else None


def average_gradient(parameter: torch.Tensor) -> None:
    """Under torchrun, average a gradient the model's DistributedDataParallel does not see (a learned scale)."""
    if parameter.grad is not None:
        parameter.grad.copy_(torch.tensor(mean_over_ranks(float(parameter.grad))))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_clip.py", description=__doc__)
    add_run_args(parser, epochs=100, batch_size=128, lr=2e-6)
    add_model_args(parser)
    parser.add_argument("--encoder", choices=ENCODER_CHOICES, default="both", help="which towers to fine-tune")
    parser.add_argument("--weight-decay", type=number(0, 1e3), default=0.01)
    parser.add_argument("--grad-checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--preprocess", choices=["targetpad", "squarepad", "openclip"], default="targetpad")
    parser.add_argument("--target-ratio", type=number(1, 100), default=1.25,
                        help="targetpad: pad images whose aspect ratio exceeds this")
    add_recipe_args(parser, stage=1)
    args = parser.parse_args(argv)
    apply_recipe(args, stage=1)
    check_run_args(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_distributed(train, parse_args(argv))


def train(args: argparse.Namespace, ddp: Dist, device: torch.device) -> int:
    source = source_from_args(args)
    run_dir, params = open_run(args, ddp.world_size)
    checkpoint = run_dir.latest_checkpoint() if args.resume else None
    if checkpoint is not None:
        encoder = load_encoder(checkpoint / "model.safetensors", device)
    else:
        encoder = load_model(args.model, args.pretrained, args.clip_checkpoint, args.seed, args.preprocess,
                             args.target_ratio, device)
    train_set = TripletDataset(source, "train", transform=encoder.transform, randomize_captions=True, seed=args.seed,
                               skip_empty_captions=True)
    check_batch_fits(args.batch_size, ddp.world_size, len(train_set))
    data = {"train": train_set.record(), "skipped_empty_captions": train_set.empty_captions}
    if args.resume:
        run_dir.check_same_data(data)  # (a run stopped before its first checkpoint starts again from step 0)

    model = encoder.model
    trainable = set_trainable(model, args.encoder)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    features: nn.Module = TowerFeatures(encoder, args.encoder)
    if ddp.enabled:
        features = DistributedDataParallel(features, device_ids=[device.index] if device.type == "cuda" else None)
    temperature = Temperature(args.learn_temperature).to(device)
    groups = [{"params": trainable}] + ([{"params": [temperature.log_scale], "weight_decay": 0.0}]
                                        if args.learn_temperature else [])
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-7, weight_decay=args.weight_decay)
    dtype, use_scaler = amp_settings(device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    if checkpoint is not None:
        state = run_dir.resume(checkpoint, optimizer, scaler, ddp.rank, ddp.is_main)
        temperature.log_scale.data.fill_(state.get("log_scale", temperature.log_scale.item()))
    else:
        state = new_state()
        if ddp.is_main:
            run_dir.start({**params, "training_data": data})
        torch.manual_seed(args.seed + ddp.rank)
    if ddp.is_main and train_set.empty_captions:
        print(f"training on {len(train_set):,} triplets; skipped {train_set.empty_captions:,} with an empty caption")

    sampler = EpochSampler(len(train_set), args.batch_size, args.seed, ddp.rank, ddp.world_size,
                           batch_groups(train_set, args.hard_negatives))
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        **loader_options(args.workers, device, args.seed))

    def write_model(path, metrics) -> None:
        save_encoder(encoder, path, {"epoch": state["epoch"], "global_step": state["global_step"],
                                     "metrics": metrics, "stage": "clip-finetune", "encoder": args.encoder,
                                     "data": data})

    def start_epoch(epoch: int) -> None:
        train_set.set_epoch(epoch)
        set_train_mode(model, args.encoder)

    def step(batch: dict, epoch: int) -> tuple[float, int]:
        captions = [train_set.caption(i) for i in batch["index"].tolist()]
        loss = training_step(features, encoder, batch, captions, dtype, temperature(), args.symmetric,
                             args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.learn_temperature:
            average_gradient(temperature.log_scale)
        scaler.step(optimizer)
        scaler.update()
        encoder.invalidate_fingerprint()
        state["log_scale"] = temperature.log_scale.item()
        return mean_over_ranks(loss.item()), len(captions) * ddp.world_size

    def validate() -> dict:
        model.eval()
        return evaluate(encoder, source, workers=args.workers, progress=not args.quiet)

    run_epochs(run_dir, state, epochs=args.epochs, sampler=sampler, batches=loader, step=step, validate=validate,
               val_every=args.val_every, write_model=write_model, parameters=model.parameters,
               optimizer=optimizer, scaler=scaler, save_best=args.save_best, start_epoch=start_epoch,
               max_steps=args.max_steps, save_every=args.save_every, progress=not args.quiet, is_main=ddp.is_main)
    return 0


def check_batch_fits(batch_size: int, world_size: int, n: int) -> None:
    """One global batch (batch size × processes) must fit in the training data."""
    if batch_size * world_size > n:
        where = f" × {world_size} processes" if world_size > 1 else ""
        raise ValueError(f"--batch-size {batch_size}{where} is larger than the {n:,} training triplets")


if __name__ == "__main__":
    raise SystemExit(run(main))
