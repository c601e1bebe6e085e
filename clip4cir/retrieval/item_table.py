"""A catalog's items by row, in compact columns that load memory-mapped: ids (fixed-width bytes, with a sorted
copy for lookup by binary search), image paths (one byte array and offsets), and the categories and splits each
item belongs to (a name list and, per item, the names' numbers). Removed items stay as tombstones until the
index is rebuilt; the category filters of a search are derived from these columns."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip4cir.core.errors import CatalogIndexError

GROUPS = ("categories", "splits")


@dataclass(frozen=True)
class Item:
    """A catalog image: its id, file, and the categories and splits it belongs to (FashionIQ lists some ids in
    several categories' and splits' files; a plain image folder has at most one category and no split)."""

    id: str
    path: str
    categories: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()


class StringColumn:
    """Strings as one UTF-8 byte array and offsets: compact, memory-mappable, appendable."""

    def __init__(self, data: np.ndarray | None = None, offsets: np.ndarray | None = None):
        self.data = data if data is not None else np.zeros(0, dtype=np.uint8)
        self.offsets = offsets if offsets is not None else np.zeros(1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> str:
        return bytes(self.data[self.offsets[row]:self.offsets[row + 1]]).decode("utf-8")

    def extend(self, strings: Sequence[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        self.offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(lengths)])
        self.data = np.concatenate([self.data, np.frombuffer(b"".join(encoded), dtype=np.uint8)])

    def save(self, folder: Path, name: str) -> None:
        np.save(folder / f"{name}.bytes.npy", self.data)
        np.save(folder / f"{name}.offsets.npy", self.offsets)

    @classmethod
    def load(cls, folder: Path, name: str) -> StringColumn:
        return cls(np.load(folder / f"{name}.bytes.npy", mmap_mode="r"),
                   np.load(folder / f"{name}.offsets.npy", mmap_mode="r"))


class NameSets:
    """A set of names per item (its categories, or its splits): the names once, per item their numbers."""

    def __init__(self, names: list[str] | None = None, codes: np.ndarray | None = None,
                 offsets: np.ndarray | None = None):
        self.names = names or []
        self.codes = codes if codes is not None else np.zeros(0, dtype=np.int32)
        self.offsets = offsets if offsets is not None else np.zeros(1, dtype=np.int64)
        self._rows: dict[str, np.ndarray] | None = None

    def of(self, row: int) -> tuple[str, ...]:
        return tuple(self.names[c] for c in self.codes[self.offsets[row]:self.offsets[row + 1]])

    def extend(self, sets: Sequence[Sequence[str]]) -> None:
        number = {name: i for i, name in enumerate(self.names)}
        for names in sets:
            for name in names:
                if name not in number:
                    number[name] = len(self.names)
                    self.names.append(name)
        codes = np.fromiter((number[n] for names in sets for n in names), dtype=np.int32)
        lengths = np.fromiter((len(names) for names in sets), dtype=np.int64, count=len(sets))
        self.codes = np.concatenate([self.codes, codes])
        self.offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(lengths)])
        self._rows = None

    def rows(self) -> dict[str, np.ndarray]:
        """The rows of each name, computed once (after a change, again)."""
        if self._rows is None:
            owner = np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))
            self._rows = {name: owner[self.codes == i] for i, name in enumerate(self.names)}
        return self._rows

    def save(self, folder: Path, name: str) -> None:
        np.save(folder / f"{name}.codes.npy", self.codes)
        np.save(folder / f"{name}.offsets.npy", self.offsets)

    @classmethod
    def load(cls, folder: Path, name: str, names: list[str]) -> NameSets:
        return cls(list(names), np.load(folder / f"{name}.codes.npy", mmap_mode="r"),
                   np.load(folder / f"{name}.offsets.npy", mmap_mode="r"))


class ItemTable:
    """The items by row; lookup of a live row by id; tombstones for removed items. A relative image path is
    relative to ``root`` (the index folder: an index shipped beside its images)."""

    def __init__(self):
        self.root: Path | None = None
        self.ids = np.zeros(0, dtype="S1")
        self.paths = StringColumn()
        self.groups = {group: NameSets() for group in GROUPS}
        self.deleted = np.zeros(0, dtype=bool)
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # (ids sorted, their rows)

    def __len__(self) -> int:
        """Rows, removed ones included."""
        return len(self.ids)

    def live(self) -> int:
        return int(len(self.deleted) - self.deleted.sum())

    def sorted_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids in sorted order and their rows (for lookups by id or prefix)."""
        if self._sorted is None:
            order = np.argsort(self.ids, kind="stable")
            self._sorted = (self.ids[order], order)
        return self._sorted

    def row(self, item_id: str) -> int | None:
        """The live row of an id, or None."""
        ids, rows = self.sorted_ids()
        key = np.array(item_id.encode("utf-8"), dtype=ids.dtype)
        if key.tobytes().rstrip(b"\0") != item_id.encode("utf-8"):  # longer than every stored id
            return None
        start, stop = np.searchsorted(ids, key, "left"), np.searchsorted(ids, key, "right")
        for row in rows[start:stop]:
            if not self.deleted[row]:
                return int(row)
        return None

    def item(self, row: int) -> Item:
        path = self.paths[row]
        if self.root is not None and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(self.root, path))
        return Item(self.ids[row].decode("utf-8"), path, self.groups["categories"].of(row),
                    self.groups["splits"].of(row))

    def add(self, items: Sequence[Item]) -> None:
        """Append items; an id that is live already, or twice in ``items``, is an error (nothing is added)."""
        seen = set()
        for item in items:
            if item.id in seen or self.row(item.id) is not None:
                raise CatalogIndexError(f"item id {item.id!r} is already in the index")
            seen.add(item.id)
        encoded = np.array([item.id.encode("utf-8") for item in items])
        width = max(self.ids.dtype.itemsize, encoded.dtype.itemsize)
        self.ids = np.concatenate([self.ids.astype(f"S{width}"), encoded.astype(f"S{width}")])
        self.paths.extend([item.path for item in items])
        self.groups["categories"].extend([item.categories for item in items])
        self.groups["splits"].extend([item.splits for item in items])
        self.deleted = np.concatenate([self.deleted, np.zeros(len(items), dtype=bool)])
        self._sorted = None

    def remove(self, rows: Sequence[int]) -> None:
        self.deleted = np.array(self.deleted)  # a memory-mapped column becomes a copy before it changes
        self.deleted[list(rows)] = True

    def save(self, folder: Path) -> dict:
        np.save(folder / "ids.npy", self.ids)
        ids, rows = self.sorted_ids()
        np.save(folder / "ids.sorted.npy", ids)
        np.save(folder / "ids.sorted-rows.npy", rows)
        self.paths.save(folder, "paths")
        for group, sets in self.groups.items():
            sets.save(folder, group)
        np.save(folder / "deleted.npy", self.deleted)
        return {group: sets.names for group, sets in self.groups.items()}

    @classmethod
    def load(cls, folder: Path, names: dict) -> ItemTable:
        table = cls()
        table.ids = np.load(folder / "ids.npy", mmap_mode="r")
        table._sorted = (np.load(folder / "ids.sorted.npy", mmap_mode="r"),
                         np.load(folder / "ids.sorted-rows.npy", mmap_mode="r"))
        table.paths = StringColumn.load(folder, "paths")
        table.groups = {group: NameSets.load(folder, group, names.get(group, [])) for group in GROUPS}
        table.deleted = np.load(folder / "deleted.npy", mmap_mode="r")
        sizes = {len(table.ids), len(table.paths), len(table.deleted), len(table._sorted[0])} | \
            {len(sets.offsets) - 1 for sets in table.groups.values()}
        if len(sizes) != 1:
            raise CatalogIndexError(f"{folder}: the item columns have different lengths {sorted(sizes)}")
        return table
