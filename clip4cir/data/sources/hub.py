"""Hugging Face ``datasets``: a data set on the Hub (``hf://datasets/OWNER/NAME``), a folder saved with
``save_to_disk``, or an ``imagefolder`` (images with a ``metadata.jsonl``). Images are read through ``datasets``
(never copied out); a Hub data set can be streamed, for building an index of a catalog larger than the disk.

Two shapes, told apart by the columns the options name:
- a catalog: an image column, and optional id, category and caption columns (ids default to the row number; a
  caption column, one text or a list per row, makes it image-text pairs: titles, descriptions);
- triplets: reference and target image columns and a caption column (one caption, or a list), optional
  category column; image ids are ``SPLIT/ROW/COLUMN``.
Every named column must exist: a missing one is an error naming it and the columns there are.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from PIL import Image

from clip4cir.core.errors import DataError
from clip4cir.core.fingerprints import digest
from clip4cir.data.images import to_rgb
from clip4cir.data.sources.base import SOURCES, EvaluationProtocol, Source, SourceKind, SourceOptions, Triplet

HUB_PREFIX = "hf://datasets/"
HUB_PROTOCOL = EvaluationProtocol("recall", (1, 5, 10, 50), per_category=False, remove_reference=True)
COLUMNS = ("image", "id", "category", "caption", "reference", "target")  # the options that name columns
VAL_NAMES = ("val", "validation", "valid", "dev")


def is_datasets_folder(path: str | os.PathLike) -> bool:
    """A folder written by ``save_to_disk`` (a Dataset or a DatasetDict), or an imagefolder with metadata."""
    path = Path(path)
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or \
        (path / "metadata.jsonl").is_file() or (path / "metadata.csv").is_file()


def _open(spec: str, streaming: bool):
    import datasets  # imported when used: loading it costs a second
    try:
        if spec.startswith(HUB_PREFIX):
            return datasets.load_dataset(spec[len(HUB_PREFIX):], streaming=streaming)
        path = Path(spec)
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as e:
        raise DataError(f"cannot open the data set {spec} with datasets: {e}") from e
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({loaded.split._name if loaded.split else "train": loaded})
    if streaming:
        loaded = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
    return loaded


class HubDataset(Source):
    kind = "hf"
    protocol = HUB_PROTOCOL

    def __init__(self, data: str, image_column: str = "image", id_column: str | None = None,
                 category_column: str | None = None, caption_column: str = "caption",
                 reference_column: str = "reference", target_column: str = "target", streaming: bool = False):
        self.spec, self.streaming = str(data), streaming
        self.columns = {"image": image_column, "id": id_column, "category": category_column,
                        "caption": caption_column, "reference": reference_column, "target": target_column}
        self.data = _open(self.spec, streaming)
        some = next(iter(self.data.values()))
        names = list(some.features or {})
        self.triplet_shaped = reference_column in names and target_column in names
        self.has_texts = not self.triplet_shaped and caption_column in names
        wanted = ["reference", "target", "caption"] if self.triplet_shaped else ["image"]
        wanted += [k for k in ("id", "category") if self.columns[k]]
        for key in wanted:
            if self.columns[key] not in names:
                raise DataError(f"{self.spec}: no column {self.columns[key]!r} (--{key}-column); the columns are "
                                f"{', '.join(names)}")
        self._label_names = None
        feature = (some.features or {}).get(category_column) if category_column else None
        if feature is not None and hasattr(feature, "names"):
            self._label_names = feature.names  # a ClassLabel column: numbers stand for names
        self._galleries: dict[str, dict[str, tuple[str, ...]]] = {}
        self._id_rows: dict[str, dict[str, int]] = {}
        splits = self.splits()
        self.protocol = EvaluationProtocol(HUB_PROTOCOL.name, HUB_PROTOCOL.ks, per_category=self.triplet_shaped and
                                           bool(category_column), remove_reference=True,
                                           val_split=next((s for s in VAL_NAMES if s in splits), splits[0]),
                                           test_split=next((s for s in ("test",) if s in splits), ""))

    def splits(self) -> tuple[str, ...]:
        return tuple(sorted(self.data, key=lambda s: (s != "train", s not in VAL_NAMES, s)))

    def _category(self, value) -> tuple[str, ...]:
        if value is None or value == "":
            return ()
        return (self._label_names[value] if self._label_names is not None else str(value),)

    def _split(self, split: str):
        self.check_split(split)
        return self.data[split]

    def _rows(self, split: str, columns: list[str]) -> Iterator[tuple[int, dict]]:
        """The rows of a split with only the given (non-image) columns: cheap to go through."""
        if not columns:
            return ((row, {}) for row in range(self.num_rows(split)))
        return enumerate(self._split(split).select_columns(columns))

    def categories(self) -> list[str]:
        if not self.columns["category"]:
            return []
        if self._label_names is not None:
            return list(self._label_names)
        return sorted({c for split in self.splits() for cs in self.gallery(split).values() for c in cs})

    def gallery(self, split: str) -> dict[str, tuple[str, ...]]:
        if split not in self._galleries:
            category = self.columns["category"]
            if self.triplet_shaped:
                out = {}
                for row, values in self._rows(split, [category] if category else []):
                    cats = self._category(values[category]) if category else ()
                    for column in ("reference", "target"):
                        out[f"{split}/{row}/{column}"] = cats
            else:
                columns = [c for c in (self.columns["id"], category) if c]
                out = {}
                for row, values in self._rows(split, columns):
                    image_id = str(values[self.columns["id"]]) if self.columns["id"] else f"{split}/{row}"
                    if image_id in out:
                        raise DataError(f"{self.spec}: split {split}: id {image_id!r} (column "
                                        f"{self.columns['id']!r}) is there twice")
                    out[image_id] = self._category(values[category]) if category else ()
            self._galleries[split] = out
        return self._galleries[split]

    def num_rows(self, split: str) -> int:
        table = self._split(split)
        if self.streaming:
            return sum(1 for _ in table.select_columns([]))
        return table.num_rows

    def triplets(self, split: str) -> list[Triplet]:
        if not self.triplet_shaped:
            return []
        columns = [self.columns["caption"]] + ([self.columns["category"]] if self.columns["category"] else [])
        out = []
        for row, values in self._rows(split, columns):
            captions = values[self.columns["caption"]]
            captions = [captions] if isinstance(captions, str) else list(captions or [])
            if not captions or not all(isinstance(c, str) for c in captions):
                raise DataError(f"{self.spec}: split {split}, row {row}: column {self.columns['caption']!r} must "
                                f"hold a caption or a list of them")
            category = self._category(values[self.columns["category"]]) if self.columns["category"] else ()
            out.append(Triplet(f"{split}/{row}/reference", f"{split}/{row}/target", tuple(captions),
                               category[0] if category else None))
        return out

    def texts(self, split: str) -> dict[str, tuple[str, ...]]:
        if not self.has_texts:
            return {}
        column, out = self.columns["caption"], {}
        for image_id, (row, values) in zip(self.gallery(split), self._rows(split, [column]), strict=True):
            value = values[column]
            texts = tuple(t.strip() for t in ([value] if isinstance(value, str) else list(value or []))
                          if isinstance(t, str) and t.strip())
            if not texts:
                raise DataError(f"{self.spec}: split {split}, row {row}: column {column!r} holds no text")
            out[image_id] = texts
        return out

    def _locate(self, image_id: str) -> tuple[str, int, str]:
        """(split, row, image column) of an id."""
        if self.triplet_shaped or not self.columns["id"]:
            parts = image_id.split("/")
            if len(parts) in (2, 3) and parts[0] in self.data and parts[1].isdigit():
                column = self.columns[parts[2]] if len(parts) == 3 else self.columns["image"]
                return parts[0], int(parts[1]), column
            raise DataError(f"{self.spec}: no image {image_id!r}")
        for split in self.splits():
            if split not in self._id_rows:
                self._id_rows[split] = {image_id_: row for row, image_id_ in enumerate(self.gallery(split))}
            rows = self._id_rows[split]
            if image_id in rows:
                return split, rows[image_id], self.columns["image"]
        raise DataError(f"{self.spec}: no image with id {image_id!r} (column {self.columns['id']!r})")

    def path(self, image_id: str) -> str:
        split, row, column = self._locate(image_id)
        return f"hf:{split}/{row}/{column}"

    def has_image(self, image_id: str) -> bool:
        try:
            self._locate(image_id)
            return True
        except DataError:
            return False

    def load_image(self, image_id: str) -> Image.Image:
        if self.streaming:
            raise DataError(f"{self.spec} is streamed: its images are read in order (build an index), not one "
                            f"by one; open it without streaming to train or evaluate")
        split, row, column = self._locate(image_id)
        image = self.data[split][row][column]
        if not isinstance(image, Image.Image):
            raise DataError(f"{self.spec}: split {split}, row {row}: column {column!r} does not hold an image")
        return to_rgb(image)

    def iter_images(self, split: str, start: int = 0) -> Iterator[tuple[str, Image.Image]]:
        """(id, image) of the split's gallery in order, from position ``start``: how a streamed catalog is
        encoded."""
        ids = list(self.gallery(split))
        column = self.columns["image"]
        for position, values in islice(enumerate(self._split(split).select_columns([column])), start, None):
            yield ids[position], to_rgb(values[column])

    def annotation_files(self, split: str) -> list[Path]:
        return []

    def fingerprint_parts(self, split: str, image_ids=None) -> dict:
        table = self._split(split)
        return {"source": digest(self.record(), split), "table": getattr(table, "_fingerprint", None) or self.spec,
                "rows": None if self.streaming else table.num_rows}

    def record(self) -> dict:
        spec = self.spec if self.spec.startswith(HUB_PREFIX) else str(Path(self.spec).resolve())
        return {"kind": self.kind, "data": spec, "streaming": self.streaming,
                **{f"{k}_column": v for k, v in self.columns.items()}}

    def describe(self) -> str:
        return f"the data set {self.spec}"


def open_hub(options: SourceOptions) -> HubDataset:
    columns = {f"{c}_column": getattr(options, f"{c}_column") for c in COLUMNS}
    return HubDataset(options.data, **{k: v for k, v in columns.items() if v is not None}, streaming=options.streaming)


SOURCES.add("hf", SourceKind(lambda data: data.startswith(HUB_PREFIX) or is_datasets_folder(data), open_hub))
