"""Textual inversion for zero-shot composed retrieval (Pic2Word, SEARLE, LinCIR): φ maps a CLIP feature to a
pseudo-word token, a vector in the text tower's token-embedding space that stands for the reference in a prompt
such as "a photo of $ that is red"; the text tower encodes the prompt with the placeholder's embedding replaced by
it. The query of a reference image and a caption is then one text feature, searched like a text query; with a Sum
weight w it is normalise(that feature + w × the Sum query), an ensemble of the two ways of composing the query."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from clip4cir.core.artifacts import atomic_write, input_file
from clip4cir.core.errors import ModelError
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.feature_sum import combine_sum
from clip4cir.models.tensor_files import read_tensor_file

PHI_FORMAT = "clip4cir.phi"
PLACEHOLDER = "$"
TEMPLATE = "a photo of $ that {caption}"  # Pic2Word's and SEARLE's prompt for composed queries


class Phi(nn.Module):
    """φ: a feature (``dim``) → a pseudo-word token (``width``, the token embedding's size): a three-layer MLP with
    GELU and dropout, the shape Pic2Word and SEARLE use. ``raw_input``: it reads the encoder's features as they
    come (SEARLE's published φ) rather than normalised (a φ trained here)."""

    def __init__(self, dim: int, width: int, hidden: int | None = None, dropout: float = 0.5,
                 raw_input: bool = False):
        super().__init__()
        hidden = hidden or 4 * max(dim, width)
        self.dim, self.width, self.hidden, self.dropout = dim, width, hidden, dropout
        self.raw_input = raw_input
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)

    def settings(self) -> dict:
        """What rebuilds it (a checkpoint records these)."""
        return {"dim": self.dim, "width": self.width, "hidden": self.hidden, "dropout": self.dropout,
                "raw_input": self.raw_input}


def placeholder_id(encoder: CLIPEncoder) -> int:
    """The token id of the placeholder word: one token of the encoder's tokenizer (an error if it is not)."""
    tokens = encoder.tokenizer([PLACEHOLDER], context_length=encoder.context_length)[0]
    inner = tokens[1:int((tokens != 0).sum()) - 1]  # between the start and end tokens
    if len(inner) != 1:
        raise ModelError(f"the placeholder {PLACEHOLDER!r} is {len(inner)} tokens for {encoder.describe()}, not one")
    return int(inner[0])


def token_width(encoder: CLIPEncoder) -> int:
    """The size of the text tower's token embeddings (what a pseudo token must have)."""
    embedding = getattr(encoder.model, "token_embedding", None)
    if not isinstance(embedding, nn.Embedding):
        raise ModelError(f"{encoder.describe()} has no token embedding to put a pseudo-word token in")
    return embedding.embedding_dim


def encode_with_pseudo_tokens(encoder: CLIPEncoder, texts: Sequence[str], pseudo: torch.Tensor,
                              normalize: bool = False, plain: Sequence[str] = ()) -> torch.Tensor:
    """Text features of ``texts``, each holding the placeholder at least once, with its token embedding replaced
    by that text's row of ``pseudo`` wherever it stands (gradients flow into ``pseudo``); then those of the
    ``plain`` texts (as they are), encoded in the same pass."""
    tokens = encoder.tokenize(list(texts) + list(plain)).to(encoder.device)
    where = tokens == placeholder_id(encoder)
    missing = (where[:len(texts)].sum(1) == 0).nonzero()
    if len(missing):
        raise ModelError(f"text {texts[int(missing[0])]!r} holds no placeholder {PLACEHOLDER!r} for the pseudo token")
    where[len(texts):] = False
    embeddings = encoder.model.token_embedding(tokens)
    rows = torch.cat([pseudo.to(embeddings.dtype), embeddings.new_zeros(len(plain), embeddings.shape[-1])])
    embeddings = torch.where(where[..., None], rows[:, None, :], embeddings)
    return encoder.encode_token_embeddings(tokens, embeddings, normalize)


def composed_prompts(captions: Sequence[str], template: str = TEMPLATE) -> list[str]:
    """The prompt of each caption ("is red" → "a photo of $ that is red"), the caption's first letter lowered."""
    return [template.format(caption=c.strip()[:1].lower() + c.strip()[1:]) for c in captions]


class PseudoTokenQueries:
    """Composed queries by textual inversion: the reference's feature → φ → the pseudo token in the prompt of the
    caption; the prompt's text feature (normalised) is the query, plus ``sum_weight`` × the Sum query of the
    reference and the caption's text feature when that is above 0 (then normalised again). Takes captions, not
    their features (``reads_captions``: clip4cir.models.combiner.compose_queries hands it them)."""

    reads_captions = True

    def __init__(self, phi: Phi, encoder: CLIPEncoder, template: str = TEMPLATE, sum_weight: float = 0.0):
        self.phi, self.encoder, self.template, self.sum_weight = phi.eval(), encoder, template, sum_weight

    def describe(self) -> str:
        """The prompt template, and the Sum's weight when the query adds it."""
        return self.template + (f", + {self.sum_weight:g} × Sum" if self.sum_weight else "")

    @torch.inference_mode()
    def __call__(self, reference_features: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        features = reference_features.float().to(self.encoder.device)
        pseudo = self.phi(features if self.phi.raw_input else F.normalize(features, dim=-1))
        prompts = composed_prompts(captions, self.template)
        if not self.sum_weight:
            return encode_with_pseudo_tokens(self.encoder, prompts, pseudo, normalize=True)
        # the captions' own text features (the Sum's) in the prompts' pass: one text-tower call per batch of queries
        # (in the encoder's own precision: on a GPU, Sum mode's come under autocast and differ by its rounding)
        both = encode_with_pseudo_tokens(self.encoder, prompts, pseudo, plain=captions).float()
        queries, text = F.normalize(both[:len(prompts)], dim=-1), both[len(prompts):]
        return F.normalize(queries + self.sum_weight * combine_sum(features, text), dim=-1)


def save_phi(phi: Phi, path: str | os.PathLike, method: str, template: str, encoder: dict,
             info: dict | None = None, sum_weight: float = 0.0) -> None:
    """Save atomically as ``.safetensors`` with metadata: the format, φ's settings, the method that trained it, the
    prompt template and the Sum's weight its queries are made with, and the encoder it was trained for (its
    record: fingerprint and how to rebuild it)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in phi.state_dict().items()}
    metadata = {"format": PHI_FORMAT, "settings": json.dumps(phi.settings()), "method": method,
                "template": template, "sum_weight": repr(float(sum_weight)), "encoder": json.dumps(encoder),
                "info": json.dumps(info or {})}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_phi(path: str | os.PathLike, encoder: CLIPEncoder | None = None,
             device: str | torch.device = "cpu") -> tuple[Phi, dict]:
    """A φ file and its metadata (method, template, Sum weight, encoder, info); with ``encoder``, a φ trained for
    another encoder (another fingerprint) is refused, naming both. A file written before the Sum weight was
    recorded makes queries of φ alone (weight 0), as it did then."""
    path = input_file(path, "φ checkpoint", ModelError)
    state, meta = read_tensor_file(path, PHI_FORMAT, "φ")
    phi = Phi(**json.loads(meta["settings"]))
    phi.load_state_dict(state)
    record = {"method": meta.get("method"), "template": meta.get("template", TEMPLATE),
              "sum_weight": read_sum_weight(meta.get("sum_weight", "0"), path),
              "encoder": json.loads(meta.get("encoder", "{}")), "info": json.loads(meta.get("info", "{}"))}
    trained_for = record["encoder"].get("fingerprint")
    if encoder is not None and trained_for not in (None, encoder.fingerprint()):
        raise ModelError(f"φ {path} was trained for encoder {record['encoder'].get('description', '?')} (fingerprint "
                         f"{trained_for}), not {encoder.describe()} (fingerprint {encoder.fingerprint()})")
    return phi.to(device).eval(), record


def read_sum_weight(text: str, path: Path) -> float:
    """The Sum weight recorded in a φ file: a finite number ≥ 0 (an error naming the file otherwise)."""
    try:
        weight = float(text)
    except ValueError:
        weight = float("nan")
    if not math.isfinite(weight) or weight < 0:
        raise ModelError(f"φ {path}: sum_weight {text!r} is not a number ≥ 0")
    return weight


SEARLE_ENCODERS = ("ViT-B-32", "ViT-L-14")  # the encoders SEARLE published φ for (openai weights)


def read_searle_phi(path: str | os.PathLike) -> Phi:
    """A φ published by SEARLE (a torch file ``{"Phi": state_dict}``, CC BY-NC 4.0), read as tensors only
    (``weights_only``) into a φ that reads raw features; an error naming the file when it is not one."""
    path = input_file(path, "SEARLE φ", ModelError)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path} is not a torch checkpoint SEARLE wrote ({type(e).__name__}: {e})") from e
    state = checkpoint.get("Phi") if isinstance(checkpoint, dict) else None
    expected = {f"layers.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    if not isinstance(state, dict) or set(state) != expected:
        raise ModelError(f"{path} holds no SEARLE φ (a 'Phi' entry with {', '.join(sorted(expected))})")
    first, last = state["layers.0.weight"], state["layers.6.weight"]
    try:
        phi = Phi(first.shape[1], last.shape[0], first.shape[0], raw_input=True)
        phi.load_state_dict(state)
    except (IndexError, RuntimeError) as e:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
        raise ModelError(f"{path}: φ's layers do not chain ({shapes})") from e
    return phi.eval()


def check_published_phi(phi: Phi, encoder: CLIPEncoder, any_encoder: bool = False) -> None:
    """A published φ must be for an encoder SEARLE trained for (CLIP ViT-B-32 or ViT-L-14, OpenAI's weights, not
    fine-tuned) unless ``any_encoder``, and must fit its features and token width."""
    source = encoder.source
    if not any_encoder and (source.get("model") not in SEARLE_ENCODERS or source.get("pretrained") != "openai"
                            or source.get("checkpoint")):
        raise ModelError(f"SEARLE's φ was trained for CLIP {' or '.join(SEARLE_ENCODERS)} with --pretrained openai, "
                         f"not {encoder.describe()}")
    if (phi.dim, phi.width) != (encoder.dim, token_width(encoder)):
        raise ModelError(f"this φ maps {phi.dim}-d features to {phi.width}-d tokens; {encoder.describe()} has "
                         f"{encoder.dim}-d features and {token_width(encoder)}-d tokens")


def zero_shot_queries(path: str | os.PathLike, encoder: CLIPEncoder,
                      sum_weight: float | None = None) -> PseudoTokenQueries:
    """The composed queries of the φ file at ``path`` (its own template and Sum weight, unless ``sum_weight`` is
    given), for ``encoder`` (checked)."""
    phi, record = load_phi(path, encoder, encoder.device)
    return PseudoTokenQueries(phi, encoder, record["template"],
                              record["sum_weight"] if sum_weight is None else sum_weight)
