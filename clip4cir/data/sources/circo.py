"""CIRCO (Baldrati et al., ICCV 2023), as its authors publish it, with COCO's unlabeled images::

    ROOT/annotations/{val,test}.json        [{"id", "reference_img_id", "relative_caption", "shared_concept",
                                              "target_img_id", "gt_img_ids": [...], "semantic_aspects": [...]}, ...]
    ROOT/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   {"images": [{"id", "file_name"}, ...]}
    ROOT/COCO2017_unlabeled/unlabeled2017/<file_name>                   the images (the gallery: all of them)

A zero-shot benchmark (no training split): every query has several ground truths (the target first), evaluated
with mAP@5/10/25/50 (and Recall@K of the target, mAP@10 per semantic aspect); the test split has no ground truth,
and its test server takes the top 50 unique image ids of each query (clip4cir.evaluation.composed). Image ids are
COCO's numbers, as text.
"""
from __future__ import annotations

import os
from pathlib import Path

from clip4cir.core.errors import DataError
from clip4cir.data.sources.base import (
    SOURCES,
    EvaluationProtocol,
    Source,
    SourceKind,
    Triplet,
    listed_file_exists,
    read_json_file,
    titles_beside,
)

SPLITS = ("val", "test")
IMAGE_INFO = Path("COCO2017_unlabeled") / "annotations" / "image_info_unlabeled2017.json"
IMAGES = Path("COCO2017_unlabeled") / "unlabeled2017"
CIRCO_PROTOCOL = EvaluationProtocol("circo", (5, 10, 25, 50), per_category=False, remove_reference=False,
                                    map_ks=(5, 10, 25, 50), score=("mAP@10",), test_split="test")


def is_circo_root(path: str | os.PathLike) -> bool:
    return (Path(path) / IMAGE_INFO).is_file() and (Path(path) / "annotations").is_dir()


def circo_queries(path: Path, with_truth: bool) -> list[Triplet]:
    """The queries of one annotation file, each checked (a ground-truth split needs ``gt_img_ids`` holding the
    target); the query id is kept as ``pair_id``, the ground truths and semantic aspects with it."""
    entries = read_json_file(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of queries")
    queries = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: query {n} is not a JSON object")
        if not isinstance(entry.get("gt_img_ids", []), list):
            raise DataError(f"{path}: query {n}: gt_img_ids is not a list")
        missing = [f for f in ("id", "reference_img_id", "relative_caption") if f not in entry]
        if with_truth:
            missing += [f for f in ("target_img_id", "gt_img_ids") if f not in entry]
        if missing:
            raise DataError(f"{path}: query {n} has no {', '.join(map(repr, missing))}")
        truths = tuple(str(i) for i in entry.get("gt_img_ids", ()))
        target = str(entry["target_img_id"]) if with_truth else None
        if with_truth and target not in truths:
            raise DataError(f"{path}: query {entry['id']}: its target {target} is not among its gt_img_ids")
        queries.append(Triplet(str(entry["reference_img_id"]), target, (str(entry["relative_caption"]),),
                               pair_id=str(entry["id"]), ground_truths=truths,
                               aspects=tuple(entry.get("semantic_aspects", ()))))
    return queries


class CIRCO(Source):
    kind = "circo"
    protocol = CIRCO_PROTOCOL

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not is_circo_root(self.root):
            raise DataError(f"{self.root} is not a CIRCO root: it needs annotations/ and {IMAGE_INFO}")
        self._files: dict[str, str] | None = None

    def files(self) -> dict[str, str]:
        """Image id -> file name, from COCO's image list (read once)."""
        if self._files is None:
            info = read_json_file(self.root / IMAGE_INFO)
            images = info.get("images") if isinstance(info, dict) else None
            if not isinstance(images, list) or not all(isinstance(i, dict) and "id" in i and "file_name" in i
                                                       for i in images):
                raise DataError(f"{self.root / IMAGE_INFO}: expected {{'images': [{{'id', 'file_name'}}, ...]}}")
            self._files = {str(i["id"]): str(i["file_name"]) for i in images}
        return self._files

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def titles(self) -> dict[str, str]:
        """The titles in ``pairs.jsonl`` beside the layout, by image id (files are the ids in 12 digits)."""
        return {str(int(k)) if k.isdigit() else k: v for k, v in titles_beside(self.root).items()}

    def gallery(self, split: str) -> dict[str, tuple[str, ...]]:
        self.check_split(split)
        return {image_id: () for image_id in self.files()}  # every split searches the whole unlabeled set

    def triplets(self, split: str) -> list[Triplet]:
        self.check_split(split)
        path = self.root / "annotations" / f"{split}.json"
        queries = circo_queries(path, with_truth=split == "val")
        files = self.files()
        for t in queries:
            for role, image_id in [("reference", t.reference)] + [("ground truth", g) for g in t.ground_truths]:
                if image_id not in files:
                    raise DataError(f"{path}: query {t.pair_id}: {role} {image_id} is not in {IMAGE_INFO}")
        return queries

    def path(self, image_id: str) -> str:
        name = self.files().get(image_id)
        if name is None:
            raise DataError(f"no image {image_id!r} in {self.root / IMAGE_INFO}")
        return str(self.root / IMAGES / name)

    def has_image(self, image_id: str) -> bool:
        return listed_file_exists(self.path, image_id)

    def annotation_files(self, split: str) -> list[Path]:
        return [self.root / "annotations" / f"{split}.json", self.root / IMAGE_INFO]

    def record(self) -> dict:
        return {"kind": self.kind, "data": str(self.root.resolve())}

    def describe(self) -> str:
        return f"CIRCO at {self.root}"


SOURCES.add("circo", SourceKind(is_circo_root, lambda options: CIRCO(options.data)))
