"""The project's self-describing ``.safetensors`` files (a Combiner, a φ): their tensors and string metadata, read
once, with the metadata's ``format`` checked, so a file of another kind is refused with a message naming it."""
from __future__ import annotations

import os

import torch
from safetensors import safe_open

from clip4cir.core.errors import ModelError


def read_tensor_file(path: str | os.PathLike, format: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a ``what`` file (e.g. "combiner") whose metadata ``format`` must be ``format``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ModelError(f"cannot read {what} file {path}: {e}") from e
    if meta.get("format") != format:
        raise ModelError(f"{path} is not a clip4cir {what} file (metadata 'format' is {meta.get('format')!r})")
    return tensors, meta
