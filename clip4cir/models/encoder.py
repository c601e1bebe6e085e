"""The CLIP encoder the whole project uses: an open_clip model with its tokenizer and preprocessing, giving image
and text features for retrieval (``encode_image`` / ``encode_text``, as open_clip names them), and a fingerprint
that binds features, indexes and Combiners to the exact weights they were made with."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import text_global_pool

from clip4cir.core.errors import ModelError
from clip4cir.models.transforms import Preprocess, build_transform


def trimming_is_exact(model: torch.nn.Module, tokenizer) -> bool:
    """Whether cutting the text context to the batch's longest text leaves the features unchanged: only for
    open_clip's CLIP text tower with a causal mask (later positions never reach earlier ones), a pooling that
    reads a position inside the text (EOT/argmax or first) and zero padding. Other towers get the full context."""
    return (isinstance(model, open_clip.CLIP) and getattr(model, "attn_mask", None) is not None
            and model.text_pool_type in ("argmax", "eos", "first") and isinstance(tokenizer, SimpleTokenizer))


class Encoder:
    """What every encoder has: its model, name, config and preprocessing, where its weights came from, and a
    fingerprint of them. Subclasses give image features (and text features where ``has_text``)."""

    has_text = False

    def __init__(self, model: torch.nn.Module, name: str, config: dict, preprocess: Preprocess,
                 source: dict, info: dict | None = None):
        self.model, self.name, self.config, self.preprocess = model, name, config, preprocess
        self.source, self.info = source, info or {}
        self.transform = build_transform(preprocess)
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Encoder:
        self.model.to(device)
        return self

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(images.to(self.device), normalize=normalize)

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
        """What an index, cache or Combiner stores of the encoder: its fingerprint and how to rebuild it."""
        return {"fingerprint": self.fingerprint(), "description": self.describe(), "source": self.source,
                "preprocess": self.preprocess.to_dict()}

    def describe(self) -> str:
        """The architecture and where the weights came from (a checkpoint by its file name only)."""
        src = self.source
        weights = Path(src["checkpoint"]).name if src.get("checkpoint") else \
            src.get("pretrained") or f"random init (seed {src.get('seed', 0)})"
        return f"{self.name} [{weights}]"


class CLIPEncoder(Encoder):
    """An open_clip CLIP model with its tokenizer and preprocessing: image and text features for retrieval."""

    has_text = True

    def __init__(self, model: torch.nn.Module, name: str, config: dict, preprocess: Preprocess,
                 source: dict, info: dict | None = None):
        super().__init__(model, name, config, preprocess, source, info)
        self.tokenizer = open_clip.get_tokenizer(name if name in open_clip.list_models() else "RN50")
        self.context_length = int(config["text_cfg"].get("context_length", 77))
        # False pays for the full context (the benchmark measures the difference); ignored where not exact
        self.trim_context = True
        self._trim_exact = trimming_is_exact(model, self.tokenizer)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids, trimmed to the longest text of the batch where that gives identical features."""
        tokens = self.tokenizer(list(texts), context_length=self.context_length)
        if not (self.trim_context and self._trim_exact):
            return tokens
        length = int((tokens != 0).sum(dim=1).max().clamp(min=1))
        return tokens[:, :length]

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` has with its start and end tokens; above ``context_length`` it is truncated."""
        return len(self.tokenizer.encode(text)) + 2 if hasattr(self.tokenizer, "encode") else self.context_length

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text features from strings or (possibly trimmed) token ids."""
        tokens = self.tokenize(texts) if not isinstance(texts, torch.Tensor) else texts
        tokens = tokens.to(self.device)
        if tokens.shape[1] == self.context_length or not self._trim_exact:
            return self.model.encode_text(tokens, normalize=normalize)
        return self.encode_token_embeddings(tokens, self.model.token_embedding(tokens), normalize)

    def encode_token_embeddings(self, tokens: torch.Tensor, embeddings: torch.Tensor,
                                normalize: bool = False) -> torch.Tensor:
        """The text tower from the token embeddings of ``tokens`` (some may be replaced: a pseudo-word token,
        clip4cir.models.pseudo_tokens): open_clip's CLIP.encode_text with the positional embedding and causal mask
        cut to the tokens' length."""
        model = self.model
        if not isinstance(model, open_clip.CLIP) or getattr(model, "attn_mask", None) is None:
            raise ModelError(f"{self.describe()}: its text tower takes token ids only (open_clip's CLIP text tower "
                            f"with a causal mask takes embeddings)")
        length = tokens.shape[1]
        cast_dtype = model.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type,
                             eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
                else x @ model.text_projection
        return F.normalize(x, dim=-1) if normalize else x
