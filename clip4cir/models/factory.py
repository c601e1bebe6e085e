"""Making encoders: open_clip architectures by name (JSON configs in a registry, ours in
``clip4cir/models/configs`` added to it) with weights from a pretrained tag, a local file, a checkpoint, or a
seeded random init, so a name always gives the same weights."""
from __future__ import annotations

import contextlib
import copy
import logging
import zlib
from pathlib import Path

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg

from clip4cir.core.artifacts import input_file
from clip4cir.core.errors import ModelError
from clip4cir.models.encoder import CLIPEncoder, Encoder
from clip4cir.models.encoder_file import load_encoder
from clip4cir.models.openai_checkpoint import load_openai_checkpoint
from clip4cir.models.timm_encoder import create_timm_encoder, is_timm
from clip4cir.models.transforms import Preprocess

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)


def _model_seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + seed) % (2 ** 31)


@contextlib.contextmanager
def _quiet_random_init():
    """Hide open_clip's "initialized randomly" warning: a seeded random init is what we asked for."""
    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()
    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def check_model_name(name: str) -> None:
    """ModelError unless ``name`` is an open_clip architecture (or an hf-hub: / local-dir: model, or
    ``timm/<model>``)."""
    if name.startswith(("hf-hub:", "local-dir:")) or name.replace("/", "-") in open_clip.list_models() or is_timm(name):
        return
    ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    raise ModelError(f"unknown model {name!r}; use an open_clip architecture such as RN50, RN50x4, ViT-B-32, "
                     f"or one of this project's: {', '.join(ours)} (all: open_clip.list_models())")


def create_model(name: str, pretrained: str | None = None, seed: int = 0,
                 preprocess_kind: str = "targetpad", target_ratio: float = 1.25,
                 device: str | torch.device = "cpu") -> CLIPEncoder:
    """An architecture by name with pretrained weights (tag or file), or seeded random weights when none."""
    check_model_name(name)
    quick_gelu = bool(pretrained and (get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu", False))
    with torch.random.fork_rng(devices=[]), _quiet_random_init():
        torch.manual_seed(_model_seed(name, seed))
        try:
            model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu,
                                           pretrained_text=False)
        except RuntimeError as e:
            what = f"pretrained weights {pretrained!r} for {name}" if pretrained else f"model {name}"
            raise ModelError(f"could not load {what}: the download failed or the tag/file is unknown "
                             f"(offline? put the weights in a local file and pass its path): {e}") from e
    config = copy.deepcopy(open_clip.get_model_config(name) or {})
    if name.startswith("hf-hub:") or not config:
        raise ModelError(f"{name}: only architectures with an open_clip config are supported")
    if quick_gelu:
        config["quick_gelu"] = True
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    pre = Preprocess(preprocess_kind, size, tuple(cfg["mean"]), tuple(cfg["std"]), target_ratio)
    source = {"model": name, "pretrained": pretrained} if pretrained else {"model": name, "seed": seed}
    return CLIPEncoder(model.float().eval(), name, config, pre, source).to(device)


def load_checkpoint(path: str | Path, preprocess_kind: str = "targetpad", target_ratio: float = 1.25,
                    device: str | torch.device = "cpu") -> Encoder:
    """An encoder from this project's ``.safetensors``, a CLIP4Cir ``tuned_clip_*.pt`` or an OpenAI state dict."""
    path = input_file(path, "checkpoint", ModelError)
    if path.suffix == ".safetensors":
        return load_encoder(path, device=device)
    return load_openai_checkpoint(path, preprocess_kind, target_ratio, device)


def load_model(model: str | None = None, pretrained: str | None = None, checkpoint: str | None = None,
               seed: int = 0, preprocess_kind: str = "targetpad", target_ratio: float = 1.25,
               device: str | torch.device = "cpu", embed_dim: int | None = None) -> Encoder:
    """The one entry point: a checkpoint when given, else ``model`` with ``pretrained`` (or seeded random init);
    ``timm/<model>`` is an image-only encoder with an ``embed_dim`` projection."""
    if checkpoint:
        return load_checkpoint(checkpoint, preprocess_kind, target_ratio, device)
    if not model:
        raise ModelError("give a model name (e.g. --model RN50 --pretrained openai) or a checkpoint")
    if is_timm(model):
        return create_timm_encoder(model, pretrained, seed, embed_dim, device=device)
    return create_model(model, pretrained, seed, preprocess_kind, target_ratio, device)


def check_same_encoder(recorded: dict, encoder: Encoder, artifact: str) -> None:
    """Check that ``artifact`` (e.g. "index FOLDER") was made with ``encoder``: a ModelError naming both if not."""
    if recorded.get("fingerprint") not in (None, encoder.fingerprint()):
        where = encoder.source.get("checkpoint") or encoder.describe()
        raise ModelError(f"{artifact} was made with encoder {recorded.get('description', '?')} (fingerprint "
                         f"{recorded.get('fingerprint')}), but the encoder given is {where} (fingerprint "
                         f"{encoder.fingerprint()}): use the encoder it was made with, or make it again")


def encoder_from_record(record: dict, checkpoint: str | None = None, device: str | torch.device = "cpu",
                        artifact: str = "the features") -> Encoder:
    """Rebuild the encoder a record describes (``checkpoint`` overrides its path) and check its fingerprint."""
    source, pre = record.get("source", {}), Preprocess.from_dict(record["preprocess"])
    checkpoint = checkpoint or source.get("checkpoint")
    encoder = load_model(source.get("model"), source.get("pretrained"), checkpoint, source.get("seed", 0),
                         pre.kind, pre.target_ratio, device, source.get("embed_dim"))
    check_same_encoder(record, encoder, artifact)
    return encoder
