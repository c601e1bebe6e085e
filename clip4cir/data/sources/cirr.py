"""CIRR (rc2), as users download it::

    ROOT/cirr/captions/cap.rc2.{train,val,test1}.json      [{"pairid", "reference", "target_hard", "caption",
                                                             "img_set": {"id", "members": [6 names], ...}}, ...]
    ROOT/cirr/image_splits/split.rc2.{train,val,test1}.json {name: "./train/34/name.png", ...}
    ROOT/train/34/..., ROOT/dev/..., ROOT/test1/...          the images, at the paths the split files give

One caption per triplet, no categories. Evaluated with the official protocol (see clip4cir.evaluation).
"""
from __future__ import annotations

import os
from pathlib import Path

from clip4cir.core.errors import DataError
from clip4cir.data.sources.base import (
    CIRR_PROTOCOL,
    SOURCES,
    Source,
    SourceKind,
    Triplet,
    listed_file_exists,
    read_json_file,
    titles_beside,
    triplet_entries,
)

SPLITS = ("train", "val", "test1")


def is_cirr_root(path: str | os.PathLike) -> bool:
    return (Path(path) / "cirr" / "image_splits").is_dir()


class CIRR(Source):
    kind = "cirr"
    protocol = CIRR_PROTOCOL

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not (self.root / "cirr").is_dir():
            raise DataError(f"{self.root} is not a CIRR root: it has no cirr/ folder (cirr/captions, "
                            f"cirr/image_splits)")
        self._paths: dict[str, str] = {}
        self._gallery: dict[str, dict[str, tuple[str, ...]]] = {}

    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if (self.root / "cirr" / "image_splits" / f"split.rc2.{s}.json").is_file()) \
            or SPLITS

    def _split_file(self, split: str) -> Path:
        return self.root / "cirr" / "image_splits" / f"split.rc2.{split}.json"

    def titles(self) -> dict[str, str]:
        return titles_beside(self.root)

    def gallery(self, split: str) -> dict[str, tuple[str, ...]]:
        if split not in SPLITS:
            raise DataError(f"unknown CIRR split {split!r}; choose from {', '.join(SPLITS)}")
        if split not in self._gallery:
            path = self._split_file(split)
            names = read_json_file(path)
            if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in names.items()):
                raise DataError(f"{path}: expected a JSON object of image name -> relative path")
            self._paths.update(names)
            self._gallery[split] = {name: () for name in names}
        return self._gallery[split]

    def triplets(self, split: str) -> list[Triplet]:
        gallery = self.gallery(split)
        path = self.root / "cirr" / "captions" / f"cap.rc2.{split}.json"
        triplets = []
        for i, entry in enumerate(triplet_entries(path)):
            for field in ("pairid", "reference", "caption"):
                if field not in entry:
                    raise DataError(f"{path}: entry {i} has no {field!r}")
            target = entry.get("target_hard")
            if split != "test1" and not isinstance(target, str):
                raise DataError(f"{path}: entry {i} (pairid {entry['pairid']}) has no 'target_hard'")
            members = tuple(entry.get("img_set", {}).get("members", ()))
            for role, name in (("reference", entry["reference"]), ("target_hard", target)) + \
                    tuple(("img_set member", m) for m in members):
                if name is not None and name not in gallery:
                    raise DataError(f"{path}: entry {i} (pairid {entry['pairid']}): {role} {name!r} is not in "
                                    f"{self._split_file(split).name}")
            if not isinstance(entry["caption"], str):
                raise DataError(f"{path}: entry {i} (pairid {entry['pairid']}) field 'caption' is not a string")
            triplets.append(Triplet(entry["reference"], target, (entry["caption"],), None, str(entry["pairid"]),
                                    members))
        return triplets

    def path(self, image_id: str) -> str:
        if not self._paths:
            for split in self.splits():
                if self._split_file(split).is_file():
                    self.gallery(split)
        relative = self._paths.get(image_id)
        if relative is None:
            raise DataError(f"no image {image_id!r} in the split files of {self.root / 'cirr'}")
        return str(self.root / relative)

    def has_image(self, image_id: str) -> bool:
        return listed_file_exists(self.path, image_id)

    def annotation_files(self, split: str) -> list[Path]:
        return [self.root / "cirr" / "captions" / f"cap.rc2.{split}.json", self._split_file(split)]

    def record(self) -> dict:
        return {"kind": self.kind, "data": str(self.root.resolve())}

    def describe(self) -> str:
        return f"CIRR at {self.root}"


SOURCES.add("cirr", SourceKind(is_cirr_root, lambda options: CIRR(options.data)))
