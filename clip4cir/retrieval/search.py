"""The search API: composed (reference + caption), image and text search over a catalog index.

One :class:`SearchEngine` holds the encoders, an optional Combiner and an index; it is safe to call from
several threads, also while items are added or removed (a GPU index serialises its own searches). Its models stay
in evaluation mode: the same query always gives the same results.
"""
from __future__ import annotations

import copy
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip4cir.core.device import resolve_device
from clip4cir.core.errors import CatalogIndexError, DataError, ModelError, SearchError, UnknownItemError, shown
from clip4cir.data.captions import framed, title_frame
from clip4cir.data.images import load_image
from clip4cir.models.category_probe import predict_category
from clip4cir.models.combiner import Combiner, first_stage_template, load_combiner
from clip4cir.models.encoder import Encoder
from clip4cir.models.factory import check_same_encoder, encoder_from_record
from clip4cir.models.feature_sum import combine_sum
from clip4cir.models.features import check_finite
from clip4cir.models.pseudo_tokens import PseudoTokenQueries, zero_shot_queries
from clip4cir.models.reranker import Reranker, load_reranker
from clip4cir.models.runtime import Towers
from clip4cir.retrieval.category_words import category_words, named_category
from clip4cir.retrieval.index_protocol import Index
from clip4cir.retrieval.match_levels import SAMPLE, MatchLevels, calibrate_levels, catalog_sample, right_answers
from clip4cir.retrieval.stores import load_index
from clip4cir.retrieval.threads import apply_serving_threads

MAX_K = 10_000
MAX_CAPTION_CHARS = 1_000  # a caption is cut here before tokenizing (the encoder reads 77 tokens, far fewer)
MODES = ("combiner", "sum", "phi")  # phi: zero-shot, a pseudo-word token of the reference (no triplets)
DEFAULT_CATEGORY = {"composed": "reference", "image": "reference", "text": "all"}  # the app's, the API's, here
NOTHING_FITS = "nothing in this catalog fits well: the first result stands out less than for 9 in 10 known matches"
LEVEL_KIND = {"composed": "composed", "image": "composed", "text": "text"}  # whose right answers calibrate a kind


@dataclass
class Hit:
    id: str
    score: float
    categories: list[str]
    path: str
    title: str = ""  # the item's title, when the catalog has titles
    match: str = ""  # how well it fits, in words (clip4cir.retrieval.match_levels); empty when not calibrated


@dataclass
class SearchResult:
    hits: list[Hit]
    notes: list[str] = field(default_factory=list)  # e.g. a truncated caption, the predicted category
    category: str | None = None  # the category searched within (None: all)
    seconds: float = 0.0
    fits: bool | None = None  # False: nothing in the catalog fits well (None: not calibrated for this kind)


class SearchEngine:
    """Encoders (+ optional Combiner) and an index, answering composed, image and text queries."""

    def __init__(self, index: Index, encoder: Encoder, combiner: Combiner | None = None,
                 towers: Towers | None = None, phi: PseudoTokenQueries | None = None, reranker: Reranker | None = None):
        try:
            check_same_encoder(index.encoder, encoder, "the index")
            for model in (combiner, reranker):
                if model is not None:
                    model.check_fits(encoder)
            self.index, self.encoder, self.combiner, self.phi = index, encoder, combiner, phi
            if reranker is not None:
                reranker.check_first_stage(combiner if reranker.first_stage == "combiner" else None,
                                           self.title_template(reranker.first_stage))
        except ValueError as e:
            raise SearchError(str(e)) from e
        self.reranker = reranker.eval() if reranker is not None else None
        self.towers = towers or Towers(encoder)  # what encodes queries (clip4cir.models.runtime)
        self.runtime_note = self.towers.describe()
        self.encoder.model.eval()  # for good: serving never switches modes (other threads may be encoding)
        if combiner is not None:
            combiner.eval()
        self._levels: MatchLevels | None = None
        self._vocabulary: dict[str, str] | None = None
        self._once = threading.Lock()

    def match_levels(self) -> MatchLevels | None:
        """The match levels of this catalog (computed once, on first use); None for an empty catalog."""
        with self._once:
            if self._levels is None and len(self.index):
                ids = self.index.ids(min(len(self.index), 50 * SAMPLE))
                self._levels = calibrate_levels(catalog_sample(ids, self.index.feature), self.known_answers(True),
                                                self.index.feature, self.top_score)
            return self._levels

    def known_answers(self, calibration: bool) -> dict:
        """The catalog's known right answers as queries of each kind (its titles as text queries, its annotated
        captions with their references as composed ones, composed the app's default way): the half the match
        levels are calibrated on (``calibration``), or the other half, held out to measure them; none for an
        encoder without words."""
        if not self.encoder.has_text:
            return {}
        template, titles = self.title_template("combiner" if self.combiner is not None else "sum"), self.index.titles
        captions = self.index.captions if template is None else {
            reference: [(framed(caption, title_frame(template, titles.get(reference))), target)
                        for caption, target in entries] for reference, entries in self.index.captions.items()}
        return right_answers(titles, captions, self.index.feature, self._encode_texts, self._compose_many,
                             calibration=calibration)

    def top_score(self, query: np.ndarray) -> float:
        """The score of the catalog's best match for a unit-length query feature."""
        return self.index.top_items(query.astype(np.float32), 1)[0][1]

    def with_towers(self, towers: Towers) -> SearchEngine:
        """Another engine over the same index and models whose queries ``towers`` encode (e.g. another runtime's,
        to compare with this one's); the catalog's match levels are computed first and shared, and this engine is
        left as it is (safe while it serves)."""
        self.match_levels()
        other = copy.copy(self)
        other.towers, other.runtime_note = towers, towers.describe()
        return other

    def category_vocabulary(self) -> dict[str, str]:
        """The words that name each category, from the catalog's titles (computed once)."""
        with self._once:
            if self._vocabulary is None:
                titled = [(title, tuple(self.index.item(i).categories))
                          for i, title in list(self.index.titles.items())[:50_000] if i in self.index]
                self._vocabulary = category_words(titled, self.index.categories())
            return self._vocabulary

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        out = torch.cat([self.towers.text(texts[i:i + 64]).float() for i in range(0, len(texts), 64)]).numpy()
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def _compose_many(self, references: np.ndarray, captions: list[str]) -> np.ndarray:
        """Composed queries the app's default way (the Combiner when there is one, else the Sum), unit length."""
        combine = self.combiner.combine if self.combiner is not None else combine_sum
        texts = torch.from_numpy(self._encode_texts(captions))
        with torch.inference_mode():
            out = combine(torch.from_numpy(references).float().to(self.encoder.device),
                          texts.to(self.encoder.device)).float().cpu().numpy()
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    @classmethod
    def load(cls, index_path: str | os.PathLike, clip_checkpoint: str | None = None,
             combiner_path: str | None = None, device: str = "auto", phi_path: str | None = None,
             reranker_path: str | None = None) -> SearchEngine:
        """Load an index and rebuild the encoder it records (a checkpoint path may override where it lives); a
        Combiner, φ or re-ranker trained on another encoder's features is refused."""
        index = load_index(index_path)
        encoder = encoder_from_record(index.encoder, clip_checkpoint, resolve_device(device),
                                      artifact=f"index {index_path}")
        try:
            combiner = load_combiner(combiner_path, encoder.device, encoder)[0] if combiner_path else None
            phi = zero_shot_queries(phi_path, encoder) if phi_path else None
            reranker = load_reranker(reranker_path, encoder.device, encoder) if reranker_path else None
        except ModelError as e:
            raise ModelError(f"{e} (the encoder of index {index_path})") from None
        return cls(index, encoder, combiner, phi=phi, reranker=reranker)

    # ---- query features -------------------------------------------------------------------------------------
    def _image_feature(self, image: Image.Image | str | os.PathLike | None) -> torch.Tensor:
        if image is None:
            raise SearchError("no image given")
        if not isinstance(image, Image.Image):
            try:
                image = load_image(image)
            except DataError as e:
                raise SearchError(str(e)) from e
        if image.width < 1 or image.height < 1:
            raise SearchError("the image is empty")
        x = self.encoder.transform(image)[None]  # the transform converts any mode to RGB and bounds the size
        return check_finite(self.towers.image(x)[0].float(), "image features")

    def _caption(self, caption: str | None, notes: list[str]) -> str:
        """The caption stripped, checked to be there and readable by the encoder (a note when it is cut)."""
        if not self.encoder.has_text:
            raise SearchError(f"the encoder {self.encoder.describe()} reads images only: use image search")
        caption = (caption or "").strip()
        if not caption:
            raise SearchError("the caption is empty")
        length, caption = len(caption), caption[:MAX_CAPTION_CHARS]  # cut before tokenizing: far past 77 tokens
        n_tokens = self.encoder.count_tokens(caption)
        if length > MAX_CAPTION_CHARS:
            notes.append(f"the caption has {length:,} characters; only its first {self.encoder.context_length} "
                         f"tokens were used")
        elif n_tokens > self.encoder.context_length:
            notes.append(f"the caption has {n_tokens} tokens; only the first {self.encoder.context_length} were used")
        return caption

    def _text_feature(self, caption: str | None, notes: list[str]) -> torch.Tensor:
        return check_finite(self.towers.text([self._caption(caption, notes)])[0].float(), "caption features")

    def title_template(self, mode: str) -> str | None:
        """The title template the way ``mode`` composes was trained with (the Combiner's, or the encoder's for
        the Sum); None when it was trained on captions alone."""
        return first_stage_template(self.encoder, self.combiner, mode)

    def _titled(self, caption: str, reference_id: str | None, mode: str, notes: list[str]) -> str:
        """The caption as the model was trained to read it: inside the reference's title when it was trained
        title-aware and the reference is a catalog item with a title; alone otherwise (an uploaded photo)."""
        template = self.title_template(mode)
        if template is None:
            return caption
        title = self.index.titles.get(reference_id) if reference_id is not None else None
        if not title:
            notes.append("the reference has no title: the caption alone was read")
            return caption
        return framed(caption.strip(), title_frame(template, title))

    def _category(self, category: str | None, query: torch.Tensor, notes: list[str],
                  reference: torch.Tensor | None = None, reference_id: str | None = None,
                  caption: str | None = None) -> str | None:
        """The category to search within: none for "all", the given one; for "reference", the one the caption
        names ("is a t-shirt instead of a dress": words learned from the catalog's titles), else the reference's
        own (a catalog item's first category, or what the probe predicts from an uploaded reference image); for
        "auto", what the index's probe predicts from the query feature (the composed query, the image, or the
        description)."""
        if category in (None, "", "all"):
            return None
        named = named_category(caption, self.category_vocabulary()) if category == "reference" and caption else None
        if named is not None:
            notes.append(f"the caption names {named[1]!r}: searched within {named[0]}")
            return named[0]
        if category == "reference" and reference_id:
            own = self.index.item(reference_id).categories
            notes.append("the reference's own category" if own else "the reference has no category: searched all")
            return own[0] if own else None
        if category == "reference" and reference is not None and self.index.probe is not None:
            predicted = predict_category(self.index.probe, reference.numpy())[0]
            notes.append(f"the reference looks like a {predicted}")
            return predicted
        if category in ("auto", "reference"):
            if self.index.probe is None:
                notes.append("this catalog has no categories to predict; searched all")
                return None
            predicted = predict_category(self.index.probe, query.numpy())[0]
            notes.append(f"predicted category: {predicted}")
            return predicted
        if category not in self.index.categories():
            raise UnknownItemError(f"unknown category {shown(category)}; this catalog has "
                                   f"{', '.join(self.index.categories()) or 'none'}")
        return category

    def _reference(self, image, reference_id: str | None, notes: list[str]) -> torch.Tensor:
        """The reference feature: a catalog item's stored one (no re-encoding; it wins over an image given too,
        and a note says so), or the image's."""
        if reference_id:
            if reference_id not in self.index:
                raise UnknownItemError(f"unknown item id {shown(reference_id)} (not in this catalog)")
            if image is not None:
                notes.append(f"both an image and a catalog id were given: searched with the item {reference_id}")
            return torch.from_numpy(self.index.feature(reference_id))
        if image is not None:
            return self._image_feature(image)
        raise SearchError("no reference: give an image or the id of a catalog item")

    def _search(self, kind: str, query: torch.Tensor, k: int, category: str | None, notes: list[str],
                started: float, exclude: str | None = None, parts: torch.Tensor | None = None) -> SearchResult:
        """The k best items for a query feature; with a composed query's ``parts`` (reference, caption, query)
        and a re-ranker, its first ``depth`` candidates re-ordered by it (each keeps its first-stage score)."""
        apply_serving_threads()  # this thread's FAISS threads, when serving (see clip4cir.retrieval.threads)
        first = max(k, self.reranker.depth) if parts is not None else k
        try:
            found = self.index.top_items(query.numpy(), first + (exclude is not None), category)
        except CatalogIndexError as e:
            raise SearchError(str(e)) from e
        titles = self.index.titles
        hits = [Hit(item.id, score, list(item.categories), item.path, titles.get(item.id, ""))
                for item, score in found if item.id != exclude][:first]
        if parts is not None:
            hits = self._reranked(parts, hits)
        hits = hits[:k]
        fits, levels = None, self.match_levels()
        if levels is not None and hits:
            z = levels.z(query.numpy(), [h.score for h in hits])
            for hit, value in zip(hits, z, strict=True):
                hit.match = levels.level(LEVEL_KIND[kind], value)
            fits = levels.fits(LEVEL_KIND[kind], max(z))  # the best match (re-ranked results need not lead with it)
            if fits is False:
                notes.append(NOTHING_FITS)
        return SearchResult(hits, notes, category, time.perf_counter() - started, fits)

    def _reranked(self, parts: torch.Tensor, hits: list[Hit]) -> list[Hit]:
        """The first ``depth`` hits in the re-ranker's order, then the rest as they were (so the first results do
        not depend on how many are asked for); each keeps its first-stage score."""
        head, tail = hits[:self.reranker.depth], hits[self.reranker.depth:]
        try:
            candidates = torch.from_numpy(np.stack([self.index.feature(h.id) for h in head])).float()
        except (UnknownItemError, CatalogIndexError):  # removed while this query ran: the first-stage order stands
            return hits
        order = self.reranker.rerank(parts[None], candidates[None], torch.tensor([[h.score for h in head]]))[0]
        return [head[i] for i in order.tolist()] + tail

    @staticmethod
    def _check_types(**values) -> None:
        """Each argument a string or None (a number or a list where text belongs is an error naming it)."""
        for name, value in values.items():
            if value is not None and not isinstance(value, str):
                raise SearchError(f"{name} must be a string, got {type(value).__name__} {shown(value)}")

    def _check_k(self, k: int) -> None:
        """k is a whole number from 1 to 10,000 (or the catalog's size, if smaller): never truncated or clamped."""
        largest = min(MAX_K, len(self.index))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= largest:
            raise SearchError(f"k must be a whole number from 1 to {largest:,} (the number of results), got {shown(k)}")

    # ---- queries --------------------------------------------------------------------------------------------
    def composed_search(self, caption: str, image: Image.Image | str | os.PathLike | None = None,
                        reference_id: str | None = None, k: int = 10, category: str | None = None,
                        mode: str = "combiner") -> SearchResult:
        """Items like the reference (an image, or a catalog id whose stored feature is reused) changed as the
        caption says. The reference item itself is left out of the results. ``category`` defaults to
        ``reference`` (the category the caption names, else the reference's own; ``all`` searches every one)."""
        started, notes = time.perf_counter(), []
        self._check_types(caption=caption, reference_id=reference_id, category=category, mode=mode)
        category = DEFAULT_CATEGORY["composed"] if category is None else category
        self._check_k(k)
        if mode not in MODES:
            raise SearchError(f"unknown mode {shown(mode)}; choose from {', '.join(MODES)}")
        if mode == "combiner" and self.combiner is None:
            raise SearchError("no Combiner is loaded: use mode 'sum' or load a stage-two checkpoint")
        if mode == "phi" and self.phi is None:
            raise SearchError("no φ is loaded: use mode 'sum' or load one (clip4cir train-phi trains it)")
        if (caption or "").strip() == "":
            raise SearchError("the caption is empty: say how the wanted item differs "
                              "(for similar items without a change, use image search)")
        reference = self._reference(image, reference_id, notes)
        parts = None
        if mode == "phi":  # the prompt's text feature, through torch (the pseudo token is an embedding)
            query = self.phi(reference[None], [self._caption(caption, notes)])[0]
        else:
            text = self._text_feature(self._titled(caption, reference_id, mode, notes), notes)
            combine = self.combiner.combine if mode == "combiner" else combine_sum
            with torch.inference_mode():
                query = combine(reference[None].to(self.encoder.device), text[None].to(self.encoder.device))[0]
            if self.reranker is not None and self.reranker.first_stage == mode:
                parts = torch.stack([reference.float().cpu(), text.float().cpu(),
                                     F.normalize(query.float().cpu(), dim=-1)])
        if self.reranker is not None and parts is None:
            notes.append(f"not re-ranked: the re-ranker re-ranks {self.reranker.first_stage} queries")
        query = check_finite(query.float().cpu(), "query features")
        return self._search("composed", query, k, self._category(category, query, notes, reference, reference_id,
                                                                 caption), notes, started, exclude=reference_id,
                            parts=parts)

    def image_search(self, image: Image.Image | str | os.PathLike | None = None, k: int = 10,
                     category: str | None = None, reference_id: str | None = None) -> SearchResult:
        """Items that look like the image, or like a catalog item ("more like this", the item left out), within
        the reference's category unless ``category`` says otherwise."""
        started, notes = time.perf_counter(), []
        self._check_types(reference_id=reference_id, category=category)
        category = DEFAULT_CATEGORY["image"] if category is None else category
        self._check_k(k)
        feature = self._reference(image, reference_id, notes)
        return self._search("image", feature, k, self._category(category, feature, notes, feature, reference_id),
                            notes, started, exclude=reference_id)

    def embedding_search(self, feature, k: int = 10, category: str | None = None) -> SearchResult:
        """Items nearest a query feature a client computed itself (with this index's encoder: the dimension is
        checked, the length does not matter), scored and levelled as an image query."""
        started, notes = time.perf_counter(), []
        self._check_types(category=category)
        self._check_k(k)
        try:
            vector = np.asarray(feature, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise SearchError("the embedding must be a list of numbers, each within float32's range") from None
        if vector.shape != (self.index.dim,):
            raise SearchError(f"the embedding must hold {self.index.dim} numbers (this index's dimension), got "
                              f"shape {vector.shape}")
        if not np.isfinite(vector).all() or not np.abs(vector).max() > 0:
            raise SearchError("the embedding must hold finite numbers, not all zero")
        query = torch.from_numpy(vector)
        return self._search("image", query, k, self._category(category or "all", query, notes), notes, started)

    def text_search(self, caption: str, k: int = 10, category: str | None = None) -> SearchResult:
        """Items the description fits."""
        started, notes = time.perf_counter(), []
        self._check_types(caption=caption, category=category)
        self._check_k(k)
        feature = self._text_feature(caption, notes)
        return self._search("text", feature, k, self._category(category, feature, notes), notes, started)
