"""The one interface every data set implements: its splits and categories, the triplets of a split (reference,
target, captions), the gallery of a split, its images, and how it is evaluated. Training, evaluation, index
building and the app use only this, never a data set's name.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import stat
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from clip4cir.core.errors import DataError
from clip4cir.core.fingerprints import contents, digest, file_stats
from clip4cir.core.registry import Registry
from clip4cir.data.captions import CAPTION_ONLY, caption_variants, check_title_template, eval_caption, title_frame
from clip4cir.data.images import IMAGE_EXTENSIONS, check_image_file, load_image

SHOWN = 5  # how many ids an error message lists


@dataclass(frozen=True)
class Triplet:
    """A reference image, the target image (None on a test split), the modification caption(s); the category
    when the data set has them; CIRR's pair id (CIRCO's query id) and the image subset its Recall_subset ranks
    within; CIRCO's ground truths (every image that fits, the target among them) and semantic aspects; the frame
    its captions are put in (clip4cir.data.captions.title_frame: the reference's title around them, or alone)."""

    reference: str
    target: str | None
    captions: tuple[str, ...]
    category: str | None = None
    pair_id: str | None = None
    subset: tuple[str, ...] = ()
    ground_truths: tuple[str, ...] = ()
    aspects: tuple[str, ...] = ()
    frame: str = CAPTION_ONLY

    def caption_variants(self) -> list[str]:
        """The caption variants training draws from, in this triplet's frame."""
        return caption_variants(self.captions, self.frame)

    def eval_caption(self) -> str:
        """The caption evaluation uses, in this triplet's frame."""
        return eval_caption(self.captions, self.frame)


@dataclass(frozen=True)
class EvaluationProtocol:
    """How a data set is evaluated (see clip4cir.evaluation): Recall@K over a gallery of the split (per category
    and averaged, or one gallery), with the reference left out of its own ranking or not, Recall_subset@K within
    each query's subset, mAP@K over each query's ground truths (CIRCO), and the headline score (what --save-best
    maximises)."""

    name: str
    ks: tuple[int, ...]
    per_category: bool
    remove_reference: bool
    subset_ks: tuple[int, ...] = ()
    map_ks: tuple[int, ...] = ()
    score: tuple[str, ...] = ("R@10", "R@50")  # the headline is the mean of these of the "average" metrics
    val_split: str = "val"
    test_split: str = "test"


FASHIONIQ_PROTOCOL = EvaluationProtocol("fashioniq", (10, 50), per_category=True, remove_reference=False)
CIRR_PROTOCOL = EvaluationProtocol("cirr", (1, 5, 10, 50), per_category=False, remove_reference=True,
                                             subset_ks=(1, 2, 3), score=("R@5", "Rs@1"), test_split="test1")


def read_json_file(path: Path):
    if not path.is_file():
        raise DataError(f"missing annotation file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"malformed JSON in {path}: {e}") from e


def triplet_entries(path: Path) -> list[dict]:
    """The entries of a triplet annotation file: a JSON list of objects (DataError naming the file and entry)."""
    entries = read_json_file(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of triplets, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is not an object")
    return entries


def missing_message(what: str, n_missing: int, total: int, ids: Sequence[str], where: str) -> str:
    """A readable account of missing images: how many of what, where, and the first few missing ids."""
    shown = ", ".join(ids[:SHOWN]) + (", ..." if len(ids) > SHOWN else "")
    return (f"{what}: {n_missing:,} of {total:,} miss images in {where} ({len(ids):,} image ids, first: "
            f"{shown}); pass skip_missing=True to drop them")


@dataclass
class SourceOptions:
    """How to open a data set: ``data`` (a path or ``hf://datasets/OWNER/NAME``), what it is (``dataset``, or
    "auto": recognised), and the options some kinds take (FashionIQ's ``categories``, a triplet or label file's
    ``images`` folder, how labels are split, a Hugging Face data set's columns and streaming), and the template
    that puts each reference's title around its captions (title-aware queries; None: the captions alone)."""

    data: str
    dataset: str = "auto"
    categories: str | None = None
    images: str | None = None
    split_by: str = "label"
    image_column: str | None = None
    id_column: str | None = None
    category_column: str | None = None
    caption_column: str | None = None
    reference_column: str | None = None
    target_column: str | None = None
    streaming: bool = False
    title_template: str | None = None

    def open(self) -> Source:
        if not str(self.data or "").strip():  # "" would be the current folder
            raise DataError("--data is empty: give a data set, a triplet or label file, or an image folder")
        kind = detect_kind(str(self.data)) if self.dataset in ("auto", None) else self.dataset
        source = SOURCES[kind].open(self)
        return TitledCaptions(source, self.title_template) if self.title_template is not None else source

    @classmethod
    def from_record(cls, record: dict) -> SourceOptions:
        """The options that open the source a ``Source.record()`` describes again."""
        record = dict(record)
        categories = record.pop("categories", None)
        return cls(data=record.pop("data"), dataset=record.pop("kind"),
                   categories=",".join(categories) if categories else None, **record)


class Source(ABC):
    """A data set of composed-retrieval triplets and the images they refer to (or a plain catalog of images).
    Each kind registers a :class:`SourceKind` in ``SOURCES``."""

    kind: str = ""
    protocol: EvaluationProtocol = FASHIONIQ_PROTOCOL

    @abstractmethod
    def splits(self) -> tuple[str, ...]:
        """The split names, training first."""

    def categories(self) -> list[str]:
        """The category names (empty when the data set has none)."""
        return []

    def triplets(self, split: str) -> list[Triplet]:
        """The triplets of a split, validated (a plain catalog has none)."""
        return []

    @abstractmethod
    def gallery(self, split: str) -> dict[str, tuple[str, ...]]:
        """The images of a split, each with its categories."""

    def texts(self, split: str) -> dict[str, tuple[str, ...]]:
        """The texts of each image of a split (titles, descriptions: image-text pairs); empty when it has none."""
        return {}

    def titles(self) -> dict[str, str]:
        """Each image's title (its first text), over all splits: what the app shows under an item and searches
        in its picker; empty when the data set has none."""
        return {image_id: texts[0] for split in self.splits() for image_id, texts in self.texts(split).items()
                if texts}

    @abstractmethod
    def path(self, image_id: str) -> str:
        """Where an image is: a file path, or a reference the source reads (e.g. a row of a Hub data set)."""

    @abstractmethod
    def has_image(self, image_id: str) -> bool:
        """Whether the image of an id can be found (without decoding it)."""

    def load_image(self, image_id: str) -> Image.Image:
        """The image of an id as RGB; DataError naming it when it is missing or cannot be read."""
        if not self.has_image(image_id):
            raise DataError(f"no image for id {image_id!r} in {self.describe()}")
        return load_image(self.path(image_id))

    def check_image(self, image_id: str) -> None:  # noqa: B027 (an optional hook)
        """DataError naming the image when it is not a complete image file (checked without decoding it; a
        source whose images are not files checks nothing here)."""

    @abstractmethod
    def annotation_files(self, split: str) -> list[Path]:
        """The files a split's triplets and gallery are read from (their contents are fingerprinted)."""

    @abstractmethod
    def record(self) -> dict:
        """How to open this source again (``clip4cir.data.sources.open_source(**record)``)."""

    def describe(self) -> str:
        return f"{self.kind} {self.record().get('data', '')}"

    def check_split(self, split: str) -> None:
        if split not in self.splits():
            raise DataError(f"unknown split {split!r} of {self.describe()}; it has {', '.join(self.splits())}")

    def fingerprint_parts(self, split: str, image_ids: Sequence[str] | None = None) -> dict:
        """What a split was read from, part by part (so that a change can be named): the source, each
        annotation file's contents, and the images' files (path, size, modification time); ``image_ids``
        narrows the images to those used."""
        ids = image_ids if image_ids is not None else sorted(self.gallery(split))
        return {"source": digest(self.record(), split),
                "annotations": {str(path): contents([path]) for path in self.annotation_files(split)},
                "images": len(ids), "image_files": file_stats(self.path(i) for i in ids if self.has_image(i))}

    def fingerprint(self, split: str, image_ids: Sequence[str] | None = None) -> str:
        """One hash of :meth:`fingerprint_parts`."""
        return digest(self.fingerprint_parts(split, image_ids))


def describe_change(saved: dict, now: dict) -> str:
    """What differs between two :meth:`Source.fingerprint_parts`, in words."""
    changes = []
    if saved.get("source") != now.get("source"):
        changes.append("the data set is opened differently (another path, kind or option)")
    old, new = saved.get("annotations", {}), now.get("annotations", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            changes.append(f"annotation file {name} " + ("is new" if name not in old else "is gone"
                                                         if name not in new else "changed"))
    if saved.get("images") != now.get("images"):
        changes.append(f"{saved.get('images')} images then, {now.get('images')} now")
    elif saved.get("image_files") != now.get("image_files"):
        changes.append(f"an image file of the {now.get('images')} changed (its path, size or modification time "
                       f"differs)")
    for key in sorted((set(saved) | set(now)) - {"source", "annotations", "images", "image_files"}):
        if saved.get(key) != now.get(key):
            changes.append(f"{key} was {saved.get(key)!r}, now {now.get(key)!r}")
    return "; ".join(changes) or "its fingerprint differs"


@dataclass(frozen=True)
class SourceKind:
    """A kind of data set: whether it recognises a ``--data`` value, and how it opens from options; a fallback
    kind is asked only when no other recognises the data (a plain image folder)."""

    detect: Callable[[str], bool]
    open: Callable[[SourceOptions], Source]
    fallback: bool = False


SOURCES: Registry[SourceKind] = Registry("--dataset")
ANNOTATION_FILES = (".jsonl", ".csv")


def special_kind(path: Path) -> str:
    """What a path that is not a regular file is, as a message says it."""
    if not path.exists():
        return "a link to nothing" if path.is_symlink() else "missing"
    mode = path.stat().st_mode
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode) else
            "not a regular file")
    return f"{kind}{', through a link' if path.is_symlink() else ''}: not an image file"


def detect_kind(data: str) -> str:
    """The registered kind that recognises ``data`` (a fallback kind only when no other does)."""
    if not data.startswith("hf://") and not Path(data).exists():
        raise DataError(f"--data {data} does not exist")
    for kind, entry in sorted(SOURCES.items(), key=lambda item: item[1].fallback):
        if entry.detect(data):
            return kind
    if Path(data).suffix.lower() in ANNOTATION_FILES:
        header = csv_header(Path(data)) if Path(data).suffix.lower() == ".csv" else []
        raise DataError(f"{data}: the CSV header names neither triplets (reference, caption, target, ...) nor "
                        f"labelled images ('image' and 'label'); got {header}")
    raise DataError(f"--data {data}: no data set kind recognises it; give --dataset ({', '.join(SOURCES)})")


def listed_file_exists(path_of: Callable[[str], str], image_id: str) -> bool:
    """Whether the file the source lists for an id exists (an id it does not list: no)."""
    try:
        return Path(path_of(image_id)).is_file()
    except DataError:
        return False


def jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSON Lines file; DataError naming the line otherwise."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number} is not JSON: {e}") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number} is not a JSON object")
            rows.append((number, row))
    return rows


def table_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, fields) of every row of a CSV or JSON Lines file (by its suffix)."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, row) for row in reader]
    return jsonl_rows(path)


def titles_beside(root: Path, name: str = "pairs.jsonl") -> dict[str, str]:
    """The titles in the image-text pairs file ``root/name`` (JSON Lines of ``image`` and ``text``, as this
    project writes beside a FashionIQ or CIRR layout), by image id (the file name without its extension);
    empty when there is no such file."""
    path = root / name
    if not path.is_file():
        return {}
    titles: dict[str, str] = {}
    for number, row in jsonl_rows(path):
        image, text = row.get("image"), row.get("text")
        if not isinstance(image, str) or not isinstance(text, str):
            raise DataError(f"{path}: line {number}: fields 'image' and 'text' must be strings")
        titles.setdefault(Path(image).name.rsplit(".", 1)[0], text.strip())
    return titles


def csv_header(path: Path) -> list[str]:
    """The first row of a CSV file (empty when it is not one)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def local_path(spec: str | os.PathLike) -> Path:
    return Path(spec).expanduser()


def image_files(root: Path) -> tuple[list[Path], list[str]]:
    """The image files under ``root`` (by extension), following symbolic links to folders and files, each real
    folder walked once (a link loop is walked no further); and, as problems to report, the links that point
    nowhere and the folders that loop."""
    found, problems, seen = [], [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            problems.append(f"{folder} (a link to a folder already read: not read twice)")
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.is_file():
                found.append(path)
            else:
                problems.append(f"{path} ({special_kind(path)})")
        for name in subfolders:
            if not (Path(folder) / name).exists():
                problems.append(f"{Path(folder) / name} (a link to nothing)")
    return found, problems


@dataclass
class ImageFolder:
    """The image files under a folder, found by their path relative to it, with or without extension (symbolic
    links followed; broken ones reported with a warning, never dropped silently)."""

    root: Path
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.root.is_dir():
            raise DataError(f"missing image folder {self.root}")
        paths, problems = image_files(self.root)
        if problems:
            shown = "; ".join(problems[:SHOWN]) + ("; ..." if len(problems) > SHOWN else "")
            warnings.warn(f"{len(problems):,} entries under {self.root} are left out: {shown}", stacklevel=2)
        for path in paths:
            relative = path.relative_to(self.root).as_posix()
            self.files.setdefault(relative, relative)
            stem = relative.rsplit(".", 1)[0]
            old = self.files.get(stem)
            if old is None or IMAGE_EXTENSIONS.index(path.suffix.lower()) < \
                    IMAGE_EXTENSIONS.index(Path(old).suffix.lower()):
                self.files[stem] = relative

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.files

    def path(self, image_id: str) -> str:
        name = self.files.get(image_id)
        if name is None:
            raise DataError(f"no image for id {image_id!r} in {self.root}")
        return str(self.root / name)


class FileSource(Source):
    """A source whose images are files in one folder tree (``self.images``)."""

    images: ImageFolder

    def path(self, image_id: str) -> str:
        return self.images.path(image_id)

    def has_image(self, image_id: str) -> bool:
        return image_id in self.images

    def check_image(self, image_id: str) -> None:  # noqa: B027 (an optional hook)
        check_image_file(self.path(image_id))


def check_images_readable(source: Source, image_ids) -> None:
    """Before a run: every image it will read is a complete image file (header and end marker, see
    clip4cir.data.images.check_image_file), so a bad one stops it now, not at an epoch's end. One DataError lists
    the bad files."""
    bad = []
    for image_id in dict.fromkeys(image_ids):
        try:
            source.check_image(image_id)
        except DataError as e:
            bad.append(str(e))
    if bad:
        shown = "; ".join(bad[:SHOWN]) + ("; ..." if len(bad) > SHOWN else "")
        raise DataError(f"{len(bad):,} images cannot be read: {shown}")


class TitledCaptions(Source):
    """A data set whose triplets are title-aware: each reference's title put around its captions by ``template``
    ("{title} that {caption}"), so training, evaluation and the app read one text; a reference without a title
    keeps its captions alone. ``titles`` replaces the source's own (e.g. what an uploaded photo's nearest catalog
    items are called). Everything else is the wrapped source's."""

    def __init__(self, source: Source, template: str, titles: dict[str, str] | None = None):
        self.source, self.template = source, check_title_template(template)
        self.kind, self.protocol = source.kind, source.protocol
        self._titles = source.titles() if titles is None else titles
        if titles is None and not self._titles:
            raise DataError(f"--title-template: {source.describe()} has no titles (image-text pairs beside it, "
                            f"such as pairs.jsonl)")

    def __getattr__(self, name: str):  # what only some kinds have (labels, Hub columns, attributes)
        source = self.__dict__.get("source")  # absent while unpickling or copying (DataLoader workers)
        if source is None:
            raise AttributeError(name)
        return getattr(source, name)

    def splits(self) -> tuple[str, ...]:
        return self.source.splits()

    def categories(self) -> list[str]:
        return self.source.categories()

    def triplets(self, split: str) -> list[Triplet]:
        return [dataclasses.replace(t, frame=title_frame(self.template, self._titles.get(t.reference)))
                for t in self.source.triplets(split)]

    def gallery(self, split: str) -> dict[str, tuple[str, ...]]:
        return self.source.gallery(split)

    def texts(self, split: str) -> dict[str, tuple[str, ...]]:
        return self.source.texts(split)

    def titles(self) -> dict[str, str]:
        return self._titles

    def path(self, image_id: str) -> str:
        return self.source.path(image_id)

    def has_image(self, image_id: str) -> bool:
        return self.source.has_image(image_id)

    def load_image(self, image_id: str) -> Image.Image:
        return self.source.load_image(image_id)

    def check_image(self, image_id: str) -> None:
        self.source.check_image(image_id)

    def annotation_files(self, split: str) -> list[Path]:
        return self.source.annotation_files(split)

    def record(self) -> dict:
        return {**self.source.record(), "title_template": self.template}

    def describe(self) -> str:
        return f"{self.source.describe()} with titles ({self.template!r})"

    def fingerprint_parts(self, split: str, image_ids: Sequence[str] | None = None) -> dict:
        """The wrapped source's (the gallery's files are the same; the triplets' frames are fingerprinted with
        them: clip4cir.data.datasets.TripletDataset)."""
        return self.source.fingerprint_parts(split, image_ids)
