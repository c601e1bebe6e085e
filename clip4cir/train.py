"""Stage one (``scripts/train_clip.py``): task-oriented fine-tuning of the CLIP image and/or text encoder.

Query = normalise(image feature of the reference + text feature of the caption), target = normalise(image
feature of the target), logits = 100 · query · targetᵀ over the batch, cross-entropy against the diagonal.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .checkpointing import RunDir, set_rng_state
from .cli import add_model_args, run
from .data import CATEGORIES, DataError, TripletDataset, load_triplets, parse_categories
from .evaluation import fashioniq_recall
from .features import loader_options
from .loop import EpochSampler, new_state, run_epochs
from .models import CLIPEncoder, load_encoder, load_model, resolve_device, save_encoder

LOGIT_SCALE = 100.0
ENCODER_CHOICES = ("both", "image", "text")


def contrastive_loss(query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of 100 · normalised query · normalised targetᵀ, each query's own target as the class."""
    logits = LOGIT_SCALE * F.normalize(query.float(), dim=-1) @ F.normalize(target.float(), dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


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
    if device.type != "cuda":
        return None, False
    return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)


def training_step(encoder: CLIPEncoder, batch: dict, captions: list[str], train_towers: str,
                  amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The loss of one batch (graph attached to the trained towers only)."""
    device = encoder.device
    images = torch.cat([batch["reference"], batch["target"]]).to(device, non_blocking=True)
    tokens = encoder.tokenize(captions)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        with torch.set_grad_enabled(train_towers != "text"):
            image_features = encoder.encode_image(images)
        with torch.set_grad_enabled(train_towers != "image"):
            text_features = encoder.encode_text(tokens)
    reference, target = image_features.float().chunk(2)
    return contrastive_loss(reference + text_features.float(), target)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_clip.py", description=__doc__)
    parser.add_argument("--data", required=True, help="FashionIQ-layout root")
    add_model_args(parser)
    parser.add_argument("--output", required=True, help="run folder: params.json, metrics.jsonl, checkpoints")
    parser.add_argument("--encoder", choices=ENCODER_CHOICES, default="both", help="which towers to fine-tune")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-6)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and after the last)")
    parser.add_argument("--save-best", action="store_true", help="keep best.safetensors (mean of avg R@10, R@50)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output exactly")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--max-steps", type=int, default=0, help="stop (resumably) after this many steps in all")
    parser.add_argument("--grad-checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--preprocess", choices=["targetpad", "squarepad", "openclip"], default="targetpad")
    parser.add_argument("--target-ratio", type=float, default=1.25)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "val_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    args.categories = ",".join(parse_categories(args.categories))
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
    for category in categories:  # validation data must exist before hours of training
        load_triplets(args.data, category, "val")
    if args.resume:
        encoder = load_encoder(run_dir.file("last.safetensors"), device=device)
    else:
        encoder = load_model(args.model, args.pretrained, args.clip_checkpoint, args.seed, args.preprocess,
                             args.target_ratio, device)
    train_set = TripletDataset(args.data, "train", categories, transform=encoder.transform,
                               randomize_captions=True, seed=args.seed)
    if args.batch_size > len(train_set):
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_set):,} training triplets")

    model = encoder.model
    trainable = set_trainable(model, args.encoder)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-7,
                                  weight_decay=args.weight_decay)
    amp_dtype, use_scaler = amp_settings(device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    state = new_state()
    if args.resume:
        saved = run_dir.load_state()
        if encoder.info.get("global_step") != saved["global_step"]:
            raise DataError(f"{run_dir.file('last.safetensors')} (step {encoder.info.get('global_step')}) does not "
                            f"match {run_dir.state_file} (step {saved['global_step']})")
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state = {k: saved[k] for k in state}
        set_rng_state(saved["rng"])
        run_dir.truncate_metrics(state["epoch"])
    else:
        run_dir.start(params)
        torch.manual_seed(args.seed)

    sampler = EpochSampler(len(train_set), args.batch_size, args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        **loader_options(args.workers, device))

    def info(metrics) -> dict:
        return {"epoch": state["epoch"], "global_step": state["global_step"], "metrics": metrics,
                "stage": "clip-finetune", "encoder": args.encoder}

    def start_epoch(epoch: int) -> None:
        train_set.set_epoch(epoch)
        set_train_mode(model, args.encoder)

    def step(batch: dict, epoch: int) -> tuple[float, int]:
        captions = [train_set.caption(i) for i in batch["index"].tolist()]
        loss = training_step(encoder, batch, captions, args.encoder, amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        encoder.invalidate_fingerprint()
        return loss.item(), len(captions)

    def validate() -> dict:
        model.eval()
        return fashioniq_recall(encoder, args.data, categories, workers=args.workers, progress=not args.quiet)

    def save(metrics: dict | None) -> None:
        save_encoder(encoder, run_dir.file("last.safetensors"), info(metrics))
        run_dir.save_state({**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})

    def save_best(record: dict) -> None:
        save_encoder(encoder, run_dir.file("best.safetensors"), info(record))

    run_epochs(run_dir, state, epochs=args.epochs, sampler=sampler, batches=loader, step=step, validate=validate,
               val_every=args.val_every, save=save, save_best=save_best if args.save_best else None,
               start_epoch=start_epoch, max_steps=args.max_steps, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
