"""Re-ranking a composed query's first candidates with a second, finer scorer than one dot product: each candidate's
image feature attends over the query's parts (the reference's image feature, the caption's text feature and the
first stage's query, each marked with what it is), and a small MLP reads the candidate, what it attended to and
their product; its output is added to the first stage's score. The last layer starts at zero, so an untrained
re-ranker keeps the first stage's order. Trained on cached features of the triplets (combiner.reranking).

Its file (``.safetensors``): the state dict, with metadata ``format`` = ``clip4cir.reranker``, ``version``,
``feature_dim``, ``width``, ``heads``, ``depth`` (how many candidates it re-scores), ``first_stage`` (the way of
composing whose candidates it was trained on: ``combiner`` or ``sum``), ``combiner`` (that Combiner's fingerprint;
empty for the Sum), ``encoder`` (JSON: the encoder whose features it reads), ``data`` and ``info`` (JSON). Another
encoder, another Combiner or another title template than it was trained with is refused.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from clip4cir.core.artifacts import atomic_write, input_file
from clip4cir.core.errors import ModelError
from clip4cir.data.captions import trained_title_template
from clip4cir.models.combiner import Combiner
from clip4cir.models.encoder import CLIPEncoder
from clip4cir.models.tensor_files import read_tensor_file

RERANKER_FORMAT = "clip4cir.reranker"
RERANKER_VERSION = 1
PARTS = ("reference", "caption", "query")  # the query's parts, in this order
FIRST_STAGES = ("combiner", "sum")


class Reranker(nn.Module):
    """Scores ``depth`` candidates of a query against the query's parts (see the module docstring)."""

    def __init__(self, feature_dim: int, width: int = 256, heads: int = 4, depth: int = 50,
                 first_stage: str = "combiner"):
        super().__init__()
        if width % heads:
            raise ValueError(f"the width {width} must be a multiple of the heads {heads}")
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"first stage must be one of {', '.join(FIRST_STAGES)}, got {first_stage!r}")
        self.feature_dim, self.width, self.heads, self.depth = feature_dim, width, heads, depth
        self.first_stage = first_stage
        self.project = nn.Linear(feature_dim, width)
        self.part = nn.Parameter(torch.randn(len(PARTS), width) * 0.02)  # which part a token is
        self.attend = nn.MultiheadAttention(width, heads, batch_first=True)
        self.score = nn.Sequential(nn.Linear(3 * width, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.score[-1].weight)
        nn.init.zeros_(self.score[-1].bias)
        self.trained_on: dict = {}  # the record of the encoder whose features it reads
        self.combiner = ""  # the fingerprint of the Combiner whose candidates it was trained on ("": the Sum)
        self.title_template: str | None = None  # the frame of its training captions (title-aware), when one
        self.path: str | None = None

    def forward(self, parts: torch.Tensor, candidates: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Scores (B, K) of candidates (B, K, d) for queries whose parts are (B, 3, d) (see PARTS), the first
        stage's scores (B, K) plus the learned correction."""
        tokens = self.project(F.normalize(parts.float(), dim=-1)) + self.part
        items = self.project(F.normalize(candidates.float(), dim=-1))
        seen, _ = self.attend(items, tokens, tokens, need_weights=False)
        return first.float() + self.score(torch.cat([items, seen, items * seen], dim=-1)).squeeze(-1)

    @torch.inference_mode()
    def rerank(self, parts: torch.Tensor, candidates: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The order (B, K) of each query's candidates by the re-ranker's scores (it has no dropout: the same in
        either mode, safe while other threads use it); ties keep the first stage's order."""
        device = self.project.weight.device
        scores = self(parts.to(device), candidates.to(device), first.to(device)).cpu()
        return torch.argsort(scores, dim=1, descending=True, stable=True)

    def check_first_stage(self, combiner: Combiner | None, title_template: str | None) -> None:
        """ModelError unless this re-ranker was trained on the candidates of ``combiner`` (None: the Sum) with
        captions read with ``title_template``."""
        name = f"re-ranker {self.path or ''}".strip()
        if self.first_stage == "combiner" and (combiner is None or combiner.fingerprint() != self.combiner):
            raise ModelError(f"{name} was trained on another Combiner's candidates (fingerprint {self.combiner}) "
                             f"than {combiner.path if combiner is not None else 'none loaded'}: train one for it "
                             f"(clip4cir train-reranker --combiner ...)")
        if title_template != self.title_template:
            raise ModelError(f"{name} was trained on captions read with title template {self.title_template!r}, "
                             f"the first stage with {title_template!r}: train it as the first stage was trained")

    def check_fits(self, encoder: CLIPEncoder) -> None:
        """ModelError, naming the files, unless this re-ranker reads ``encoder``'s features."""
        trained_on = self.trained_on.get("fingerprint")
        if trained_on and trained_on != encoder.fingerprint() or self.feature_dim != encoder.dim:
            raise ModelError(f"re-ranker {self.path or ''} was trained on features of encoder "
                             f"{self.trained_on.get('description', '?')}, not of "
                             f"{encoder.source.get('checkpoint') or encoder.describe()}: train one for this encoder")


def save_reranker(reranker: Reranker, path: str | os.PathLike, encoder: dict, info: dict | None = None,
                  data: dict | None = None) -> None:
    """Save atomically in the self-describing ``.safetensors`` format."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in reranker.state_dict().items()}
    metadata = {"format": RERANKER_FORMAT, "version": str(RERANKER_VERSION), "feature_dim": str(reranker.feature_dim),
                "width": str(reranker.width), "heads": str(reranker.heads), "depth": str(reranker.depth),
                "first_stage": reranker.first_stage, "combiner": reranker.combiner, "encoder": json.dumps(encoder),
                "data": json.dumps(data or {}), "info": json.dumps(info or {})}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_reranker(path: str | os.PathLike, device: str | torch.device = "cpu",
                  encoder: CLIPEncoder | None = None) -> Reranker:
    """A re-ranker file, in evaluation mode; with ``encoder``, one trained on another encoder's features is refused."""
    path = input_file(path, "re-ranker", ModelError)
    tensors, meta = read_tensor_file(path, RERANKER_FORMAT, "re-ranker")
    if int(meta.get("version", 0)) > RERANKER_VERSION:
        raise ModelError(f"{path} is a re-ranker of format version {meta['version']}; this clip4cir reads up to "
                         f"{RERANKER_VERSION}: upgrade clip4cir")
    try:
        reranker = Reranker(int(meta["feature_dim"]), int(meta["width"]), int(meta["heads"]), int(meta["depth"]),
                            meta["first_stage"])
        reranker.load_state_dict(tensors)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: not a complete re-ranker file ({e})") from e
    reranker.trained_on, reranker.path = json.loads(meta.get("encoder", "{}")), str(path)
    reranker.combiner = meta.get("combiner", "")
    reranker.title_template = trained_title_template(json.loads(meta.get("data", "{}")))
    if encoder is not None:
        reranker.check_fits(encoder)
    return reranker.to(device).eval()
