"""Loading, encoding with and saving CLIP encoders (open_clip architectures).

Architectures are open_clip JSON configs in a registry (ours in ``clip4cir/model_configs`` are added to it);
weights come from a pretrained tag, a local file, a CLIP4Cir checkpoint, or a seeded random init.

Saved encoder format (``.safetensors``, loads with open_clip + safetensors alone): the tensors are the
open_clip ``CLIP`` state dict; the file's metadata holds ``format`` = ``clip4cir.encoder``, ``version``,
``model_name``, ``model_config`` (JSON, the open_clip config incl. ``quick_gelu``), ``preprocess`` (JSON, see
:class:`clip4cir.transforms.Preprocess`), ``source`` (JSON: how the weights were first obtained) and ``info``
(JSON: e.g. epoch and metrics).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.pretrained import get_pretrained_cfg
from open_clip.transformer import text_global_pool
from safetensors import safe_open
from safetensors.torch import save_file

from .transforms import Preprocess, build_transform

CONFIG_DIR = Path(__file__).parent / "model_configs"
ENCODER_FORMAT = "clip4cir.encoder"
ENCODER_VERSION = "1"
open_clip.add_model_config(CONFIG_DIR)


class ModelError(ValueError):
    """A model name, tag or checkpoint cannot be used; the message says which and why."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # as a plain write would leave it, whatever the writer's temp-file mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class CLIPEncoder:
    """An open_clip CLIP model with its tokenizer and preprocessing: image and text features for retrieval."""

    def __init__(self, model: torch.nn.Module, name: str, config: dict, preprocess: Preprocess,
                 source: dict, info: dict | None = None):
        self.model, self.name, self.config, self.preprocess = model, name, config, preprocess
        self.source, self.info = source, info or {}
        self.tokenizer = open_clip.get_tokenizer(name if name in open_clip.list_models() else "RN50")
        self.context_length = int(config["text_cfg"].get("context_length", 77))
        self.transform = build_transform(preprocess)
        self.trim_context = True  # False pays for the full context (kept to measure the difference)
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "CLIPEncoder":
        self.model.to(device)
        return self

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids trimmed to the longest text of the batch (the causal text tower gives identical features)."""
        tokens = self.tokenizer(list(texts), context_length=self.context_length)
        if not self.trim_context:
            return tokens
        length = int((tokens != 0).sum(dim=1).max().clamp(min=1))
        return tokens[:, :length]

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` has with its start and end tokens; above ``context_length`` it is truncated."""
        return len(self.tokenizer.encode(text)) + 2 if hasattr(self.tokenizer, "encode") else self.context_length

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(images.to(self.device), normalize=normalize)

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text features from strings or (possibly trimmed) token ids."""
        tokens = self.tokenize(texts) if not isinstance(texts, torch.Tensor) else texts
        tokens = tokens.to(self.device)
        model = self.model
        if not isinstance(model, open_clip.CLIP) or tokens.shape[1] == self.context_length:
            return model.encode_text(tokens, normalize=normalize)
        # open_clip's CLIP.encode_text with the positional embedding and causal mask cut to the tokens' length
        length = tokens.shape[1]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type,
                             eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
                else x @ model.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def fingerprint(self) -> str:
        """A hash of the weights and preprocessing: features made by different encoders never mix."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.preprocess.to_dict(), sort_keys=True).encode())
            for key, value in sorted(self.model.state_dict().items()):
                h.update(key.encode())
                h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        """Call after changing the weights (training)."""
        self._fingerprint = None

    def record(self) -> dict:
        """What an index or Combiner stores of the encoder: its fingerprint and how to rebuild it."""
        return {"fingerprint": self.fingerprint(), "description": self.describe(), "source": self.source,
                "preprocess": self.preprocess.to_dict()}

    def describe(self) -> str:
        src = self.source
        weights = src.get("checkpoint") or src.get("pretrained") or f"random init (seed {src.get('seed', 0)})"
        return f"{self.name} [{weights}]"


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
    """ModelError unless ``name`` is an open_clip architecture (or an hf-hub: / local-dir: model)."""
    if name.startswith(("hf-hub:", "local-dir:")) or name.replace("/", "-") in open_clip.list_models():
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


def _build_from_config(config: dict) -> torch.nn.Module:
    config = copy.deepcopy(config)
    custom = config.pop("custom_text", False) or "hf_model_name" in config.get("text_cfg", {})
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    return cls(**config)


def openai_config(state_dict: dict) -> dict:
    """The open_clip config of an OpenAI-format CLIP state dict, inferred from its tensor shapes."""
    if "visual.proj" in state_dict:
        width = state_dict["visual.conv1.weight"].shape[0]
        layers = len([k for k in state_dict if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        patch = state_dict["visual.conv1.weight"].shape[-1]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {"image_size": patch * grid, "layers": layers, "width": width, "patch_size": patch}
    else:
        layers = [len({k.split(".")[2] for k in state_dict if k.startswith(f"visual.layer{b}")}) for b in (1, 2, 3, 4)]
        out = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {"image_size": out * 32, "layers": layers,
                  "width": state_dict["visual.layer1.0.conv1.weight"].shape[0], "patch_size": None}
    width = state_dict["ln_final.weight"].shape[0]
    text = {"context_length": state_dict["positional_embedding"].shape[0],
            "vocab_size": state_dict["token_embedding.weight"].shape[0], "width": width, "heads": width // 64,
            "layers": len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks")})}
    return {"embed_dim": state_dict["text_projection"].shape[1], "quick_gelu": True,
            "vision_cfg": vision, "text_cfg": text}


def _read_torch_checkpoint(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # OpenAI's released .pt files are TorchScript archives
        try:
            return torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:
            raise ModelError(f"cannot read checkpoint {path}: {first}") from first


def load_checkpoint(path: str | os.PathLike, preprocess_kind: str = "targetpad", target_ratio: float = 1.25,
                    device: str | torch.device = "cpu") -> CLIPEncoder:
    """Load an encoder from this project's ``.safetensors``, a CLIP4Cir ``tuned_clip_*.pt``
    (``{"epoch", "CLIP": state_dict}``) or a plain OpenAI-format CLIP state dict of any size."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_encoder(path, device=device)
    obj = _read_torch_checkpoint(path)
    epoch = None
    if isinstance(obj, dict) and "CLIP" in obj:
        epoch, obj = obj.get("epoch"), obj["CLIP"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    if not isinstance(obj, dict) or "text_projection" not in obj or "visual.conv1.weight" not in obj:
        raise ModelError(f"{path} is not a CLIP checkpoint (expected a CLIP4Cir 'CLIP' entry, "
                         f"an OpenAI-format state dict or a clip4cir .safetensors file)")
    state_dict = {k: v.float() for k, v in obj.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    config = openai_config(state_dict)
    model = _build_from_config(config)  # fp32 (open_clip's builder would round the weights to fp16)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit the architecture inferred from them: {e}") from e
    pre = Preprocess(preprocess_kind, config["vision_cfg"]["image_size"], target_ratio=target_ratio)
    info = {"epoch": epoch} if epoch is not None else {}
    source = {"checkpoint": str(path.resolve())}
    return CLIPEncoder(model.eval(), "openai-state-dict", config, pre, source, info).to(device)


def save_encoder(encoder: CLIPEncoder, path: str | os.PathLike, info: dict | None = None) -> None:
    """Save an encoder atomically in the self-describing ``.safetensors`` format (see module docstring)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in encoder.model.state_dict().items()}
    metadata = {"format": ENCODER_FORMAT, "version": ENCODER_VERSION, "model_name": encoder.name,
                "model_config": json.dumps(encoder.config), "preprocess": json.dumps(encoder.preprocess.to_dict()),
                "source": json.dumps(encoder.source), "info": json.dumps(info if info is not None else encoder.info)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_encoder_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a saved encoder, parsed; ModelError when the file is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ModelError(f"cannot read encoder file {path}: {e}") from e
    if meta.get("format") != ENCODER_FORMAT:
        raise ModelError(f"{path} is not a clip4cir encoder file (metadata 'format' is {meta.get('format')!r})")
    return {k: (json.loads(v) if k in ("model_config", "preprocess", "source", "info") else v)
            for k, v in meta.items()}


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> CLIPEncoder:
    """Load an encoder saved by :func:`save_encoder`."""
    meta = read_encoder_metadata(path)
    model = _build_from_config(meta["model_config"])
    with safe_open(str(path), framework="pt") as f:
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not match the stored config: {e}") from e
    source = {**meta["source"], "checkpoint": str(Path(path).resolve())}
    return CLIPEncoder(model.eval(), meta["model_name"], meta["model_config"],
                       Preprocess.from_dict(meta["preprocess"]), source, meta["info"]).to(device)


def load_model(model: str | None = None, pretrained: str | None = None, checkpoint: str | None = None,
               seed: int = 0, preprocess_kind: str = "targetpad", target_ratio: float = 1.25,
               device: str | torch.device = "cpu") -> CLIPEncoder:
    """The one entry point: a checkpoint when given, else ``model`` with ``pretrained`` (or seeded random init)."""
    if checkpoint:
        return load_checkpoint(checkpoint, preprocess_kind, target_ratio, device)
    if not model:
        raise ModelError("give a model name (e.g. --model RN50 --pretrained openai) or a checkpoint")
    return create_model(model, pretrained, seed, preprocess_kind, target_ratio, device)


def encoder_from_record(record: dict, checkpoint: str | None = None,
                        device: str | torch.device = "cpu") -> CLIPEncoder:
    """Rebuild the encoder a record describes (``checkpoint`` overrides its path) and check its fingerprint."""
    source, pre = record.get("source", {}), Preprocess.from_dict(record["preprocess"])
    checkpoint = checkpoint or source.get("checkpoint")
    encoder = load_model(source.get("model"), source.get("pretrained"), checkpoint, source.get("seed", 0),
                         pre.kind, pre.target_ratio, device)
    if encoder.fingerprint() != record["fingerprint"]:
        raise ModelError(f"encoder {encoder.describe()} (fingerprint {encoder.fingerprint()}) is not the one the "
                         f"features were made with: {record.get('description')} ({record['fingerprint']})")
    return encoder


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
    """Evaluation mode (no dropout) for the block, then the module's own mode again."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)
