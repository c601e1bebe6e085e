"""Where and at what precision the models run: device choice, mixed precision on CUDA, evaluation mode."""
from __future__ import annotations

import contextlib

import torch

from clip4cir.core.errors import ModelError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision type on CUDA: bf16 where supported, else fp16; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; a no-op when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Evaluation mode (no dropout) for the block, then the module's own mode again. Not for modules that other
    threads use at the same time (serving keeps its models in evaluation mode for good)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
