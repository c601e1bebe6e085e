"""A user's own triplets: a JSON Lines or CSV file over a folder of images.

Fields: ``reference`` and ``target`` (image files relative to the image folder, with or without extension),
``caption`` (JSONL: a string or a list; CSV: ``caption``, ``caption2``, ... columns), optional ``category`` and
optional ``split``. Without a split field, about one group of images in ten is held out as ``val``, where a
group is the images that triplets connect (a reference and its targets, their other references, ...), chosen by a
hash of the group, so the same every time: no val reference or target is ever a training image. The gallery of a
split is every image its triplets name.
"""
from __future__ import annotations

import csv
import os
import zlib
from pathlib import Path

from clip4cir.core.errors import DataError
from clip4cir.data.sources.base import (
    SOURCES,
    EvaluationProtocol,
    FileSource,
    ImageFolder,
    SourceKind,
    Triplet,
    csv_header,
    jsonl_rows,
)

OWN_PROTOCOL = EvaluationProtocol("recall", (1, 5, 10, 50), per_category=False, remove_reference=True)
FIELDS = ("reference", "caption", "target", "category", "split")


def held_out_groups(pairs: list[tuple[str, str]]) -> set[str]:
    """The images of the held-out groups: images connected by (reference, target) pairs form a group (union-find),
    and a group is held out when a hash of its first image id falls in one tenth."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for reference, target in pairs:
        a, b = root(reference), root(target)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[str, list[str]] = {}
    for image in parent:
        groups.setdefault(root(image), []).append(image)
    return {image for first, members in groups.items() if zlib.crc32(min(members).encode()) % 10 == 0
            for image in members}


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, fields) of every row of a JSONL or CSV file."""
    if not path.is_file():
        raise DataError(f"missing triplet file {path}")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("reference", "caption", "target") if not any(
                (name or "").startswith(c) for name in (reader.fieldnames or []))]
            if missing:
                raise DataError(f"{path}: the CSV header has no {', '.join(repr(c) for c in missing)} column (it "
                                f"must name the columns {', '.join(FIELDS)}; got {reader.fieldnames})")
            rows = []
            for row in reader:
                captions = [row[k] for k in sorted(k for k in row if k and k.startswith("caption")) if row[k]]
                rows.append((reader.line_num, {**{k: v for k, v in row.items() if v}, "caption": captions}))
            return rows
    return jsonl_rows(path)


def is_triplet_file(data: str) -> bool:
    path = Path(data)
    return path.is_file() and (path.suffix.lower() == ".jsonl" or
                               (path.suffix.lower() == ".csv" and "reference" in csv_header(path)))


class TripletFile(FileSource):
    kind = "triplets"

    def __init__(self, file: str | os.PathLike, images: str | os.PathLike | None = None):
        self.file = Path(file)
        self.images = ImageFolder(Path(images) if images else self.file.parent)
        self._triplets: dict[str, list[Triplet]] = {}
        rows = _rows(self.file)
        for number, row in rows:
            where = f"{self.file}: line {number}"
            captions = row.get("caption", row.get("captions"))
            captions = [captions] if isinstance(captions, str) else captions
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
                raise DataError(f"{where}: field 'caption' must be a string or a list of strings")
            for field in ("reference", "target"):
                value = row.get(field)
                if not isinstance(value, str) or not value:
                    raise DataError(f"{where}: field {field!r} is missing")
                if value not in self.images:
                    raise DataError(f"{where}: {field} {value!r} is not an image in {self.images.root}")
        val = held_out_groups([(row["reference"], row["target"]) for _, row in rows if not row.get("split")])
        for _, row in rows:
            split = row.get("split") or ("val" if row["reference"] in val else "train")
            captions = row.get("caption", row.get("captions"))
            self._triplets.setdefault(str(split), []).append(
                Triplet(row["reference"], row["target"], tuple([captions] if isinstance(captions, str) else captions),
                        row.get("category") or None))
        if not self._triplets:
            raise DataError(f"{self.file} holds no triplets")
        self.protocol = EvaluationProtocol(OWN_PROTOCOL.name, OWN_PROTOCOL.ks, per_category=bool(self.categories()),
                                           remove_reference=True, test_split="test")

    def splits(self) -> tuple[str, ...]:
        return tuple(sorted(self._triplets, key=lambda s: (s != "train", s != "val", s)))

    def categories(self) -> list[str]:
        return sorted({t.category for ts in self._triplets.values() for t in ts if t.category})

    def triplets(self, split: str) -> list[Triplet]:
        self.check_split(split)
        return list(self._triplets[split])

    def gallery(self, split: str) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for t in self.triplets(split):
            for image_id in (t.reference, t.target):
                categories = out.get(image_id, ())
                out[image_id] = categories + ((t.category,) if t.category and t.category not in categories else ())
        return out

    def annotation_files(self, split: str) -> list[Path]:
        return [self.file]

    def record(self) -> dict:
        return {"kind": self.kind, "data": str(self.file.resolve()), "images": str(self.images.root.resolve())}

    def describe(self) -> str:
        return f"the triplets of {self.file}"


SOURCES.add("triplets", SourceKind(is_triplet_file, lambda options: TripletFile(options.data, options.images)))
