"""Stage one (``scripts/train_clip.py``): task-oriented fine-tuning of the CLIP image and/or text encoder.

Query = normalise(image feature of the reference + text feature of the caption), target = normalise(image
feature of the target), logits = 100 · query · targetᵀ over the batch, cross-entropy against the diagonal.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .checkpointing import RunDir, set_rng_state
from .cli import add_model_args, run
from .data import CATEGORIES, DataError, TripletDataset, load_triplets, parse_categories
from .evaluation import fashioniq_recall
from .features import loader_options
from .models import CLIPEncoder, ModelError, load_encoder, load_model, resolve_device, save_encoder

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


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch (the same on every run and resume), optionally skipping batches already done."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator)[: self.batches_per_epoch() * self.batch_size]
        return iter(order[self.skip_batches * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip_batches) * self.batch_size


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
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": -math.inf, "loss_sum": 0.0}
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

    def save(info_metrics: dict | None = None) -> None:
        info = {"epoch": state["epoch"], "global_step": state["global_step"], "metrics": info_metrics,
                "stage": "clip-finetune", "encoder": args.encoder}
        save_encoder(encoder, run_dir.file("last.safetensors"), info)
        run_dir.save_state({**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})

    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch, state["step_in_epoch"])
        set_train_mode(model, args.encoder)
        started, waited, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(total=sampler.batches_per_epoch(), initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}",
                   disable=args.quiet, leave=False)
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - t0
            if batch is None:
                break
            captions = [train_set.caption(i) for i in batch["index"].tolist()]
            loss = training_step(encoder, batch, captions, args.encoder, amp_dtype)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            state["loss_sum"] += loss.item()
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            seen += len(captions)
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{state['loss_sum'] / state['step_in_epoch']:.4f}",
                            triplets_s=f"{seen / elapsed:.1f}")
            bar.update()
            if args.max_steps and state["global_step"] >= args.max_steps:
                bar.close()
                encoder.invalidate_fingerprint()
                save()
                print(f"stopped after {state['global_step']} steps (--max-steps); --resume continues the run")
                return 0
        bar.close()
        encoder.invalidate_fingerprint()
        seconds = time.perf_counter() - started
        record = {"epoch": epoch, "step": state["global_step"],
                  "loss": state["loss_sum"] / max(state["step_in_epoch"], 1), "seconds": seconds,
                  "triplets_per_s": seen / seconds, "data_wait_share": waited / seconds}
        last_epoch = epoch + 1 == args.epochs
        if (epoch + 1) % args.val_every == 0 or last_epoch:
            model.eval()
            metrics = fashioniq_recall(encoder, args.data, categories, workers=args.workers,
                                       progress=not args.quiet)
            record.update(metrics)
        state.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0)
        improved = "average" in record and \
            (record["average"]["R@10"] + record["average"]["R@50"]) / 2 > state["best"]
        if improved:
            state["best"] = (record["average"]["R@10"] + record["average"]["R@50"]) / 2
        run_dir.log_metrics(record)  # then the state: a crash in between re-runs the epoch and its log line
        save(record.get("average"))
        if improved and args.save_best:
            save_encoder(encoder, run_dir.file("best.safetensors"),
                         {"epoch": epoch + 1, "global_step": state["global_step"], "metrics": record,
                          "stage": "clip-finetune", "encoder": args.encoder})
        print(epoch_summary(record))
    return 0


def epoch_summary(record: dict) -> str:
    """One line per epoch: loss, throughput, and recall when validated."""
    line = (f"epoch {record['epoch'] + 1}: loss {record['loss']:.4f}, {record['seconds']:.1f}s, "
            f"{record['triplets_per_s']:.1f} triplets/s, data wait {100 * record['data_wait_share']:.0f}%")
    if "average" in record:
        line += f", val avg R@10 {record['average']['R@10']:.2f} R@50 {record['average']['R@50']:.2f}"
    return line


if __name__ == "__main__":
    raise SystemExit(run(main))
