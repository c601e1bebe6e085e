"""Checkpoints CLIP4Cir users already have: CLIP4Cir's ``tuned_clip_*.pt`` (``{"epoch", "CLIP": state_dict}``),
plain OpenAI-format CLIP state dicts and OpenAI's TorchScript files, of any size: the architecture is inferred
from the tensor shapes."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import open_clip
import torch

from clip4cir.core.errors import ModelError
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.transforms import Preprocess


def build_from_config(config: dict) -> torch.nn.Module:
    """An fp32 open_clip model from a config (open_clip's own builder would round some weights to fp16)."""
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


def load_openai_checkpoint(path: str | Path, preprocess_kind: str = "targetpad", target_ratio: float = 1.25,
                           device: str | torch.device = "cpu") -> CLIPEncoder:
    """An encoder from a CLIP4Cir ``tuned_clip_*.pt`` or a plain OpenAI-format state dict (``.pt``)."""
    path = Path(path)
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
    model = build_from_config(config)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit the architecture inferred from them: {e}") from e
    pre = Preprocess(preprocess_kind, config["vision_cfg"]["image_size"], target_ratio=target_ratio)
    info = {"epoch": epoch} if epoch is not None else {}
    source = {"checkpoint": str(path.resolve())}
    return CLIPEncoder(model.eval(), "openai-state-dict", config, pre, source, info).to(device)
