"""Writing and reading what the tools make, safely.

A file is written under a temporary name, flushed to disk and renamed into place (:func:`atomic_write`); a folder
of files is committed as one unit (:func:`write_folder`): its files are written into a temporary sibling folder,
then ``manifest.json`` (the format, every file's size and hashes, and the records that bind the artifact to the
encoder and data it was made from) is written last, then one rename puts the folder in place. A folder is only
ever replaced when it is an artifact of the same format, so a user's folder is never deleted or overwritten.
:func:`read_manifest` checks the format and every file before anything is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from .errors import ArtifactError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
FULL_HASH_LIMIT = 64 * 2 ** 20  # files up to this size are hashed in full when read; larger ones by samples
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 64 * 1024


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_path(path: Path, tag: str = "tmp") -> Path:
    """A hidden sibling name that no user file has: ``.NAME.tmp-PID-RANDOM``."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)``, flush it to disk, then rename it onto ``path``: a crash never leaves half a file."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder; expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o644)  # as a plain write would leave it, whatever the writer's temp-file mode
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _sample_digest(path: Path, size: int) -> str:
    """A hash of the size and of evenly spaced blocks: cheap to check on files of any size."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(SAMPLE_BLOCKS):
            f.seek(max(0, (size - SAMPLE_BYTES) * i // max(SAMPLE_BLOCKS - 1, 1)))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _full_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 22), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    size = path.stat().st_size
    return {"size": size, "sha256": _full_digest(path), "sample": _sample_digest(path, size)}


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; ArtifactError naming the file when it is missing or malformed."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{what}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{what}: cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise ArtifactError(f"{what}: {path} does not hold a JSON object")
    return value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _recover(path: Path) -> None:
    """Finish a replacement that a kill cut short: put the old folder back if the new one never arrived, else
    remove what is left of the old one (unless the process that moved it is still running)."""
    for old in sorted(path.parent.glob(f".{path.name}.old-*")):
        pid = old.name.rsplit(".old-", 1)[1].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if not path.exists() and (old / MANIFEST).is_file():
            os.replace(old, path)
        elif path.exists():
            shutil.rmtree(old, ignore_errors=True)


def is_artifact(path: str | os.PathLike, format: str) -> bool:
    """Whether ``path`` is a folder this project committed as an artifact of ``format``."""
    path = Path(path)
    _recover(path)
    try:
        return read_json(path / MANIFEST, format).get("format") == format
    except ArtifactError:
        return False


def check_destination(path: str | os.PathLike, format: str, flag: str = "--output") -> None:
    """Refuse, before any work, to write an artifact where it would replace something else than an artifact of
    the same format (a user's folder or file is never overwritten; an empty folder is fine)."""
    path = Path(path)
    _recover(path)
    if not path.exists():
        if path.parent.exists() and not path.parent.is_dir():
            raise ArtifactError(f"{flag} {path}: {path.parent} is a file, not a folder")
        return
    if path.is_file() or not path.is_dir():
        raise ArtifactError(f"{flag} {path} is a file; give a folder name for the {format}")
    if is_artifact(path, format) or not any(path.iterdir()):
        return
    raise ArtifactError(f"{flag} {path} already exists and is not a {format} made by this tool: it is left "
                        f"untouched; choose a new folder")


def write_folder(path: str | os.PathLike, format: str, write: Callable[[Path], None],
                 records: dict | None = None) -> dict:
    """Commit a folder artifact as one unit: ``write(tmp)`` fills a temporary folder, the manifest is written
    last, then one rename puts it at ``path`` (replacing only an artifact of the same format). Returns the
    manifest."""
    path = Path(path)
    check_destination(path, format)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        write(tmp)
        files = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(file)
            files[file.relative_to(tmp).as_posix()] = file_record(file)
        manifest = {"format": format, "version": MANIFEST_VERSION, "files": files, **(records or {})}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if path.is_dir() and any(path.iterdir()):  # an artifact of this format (checked above)
            old = temp_path(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_manifest(path: str | os.PathLike, format: str, full: bool = False) -> dict:
    """The manifest of a folder artifact, after checking its format and that every file it lists is there with
    the size and hash it had when written (in full up to 64 MiB, by samples above unless ``full``)."""
    path = Path(path)
    _recover(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a folder (expected a {format})")
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} is not a complete {format}: it has no {MANIFEST} (not written by this tool, "
                            f"written by an earlier version, or its writing was interrupted); make it again")
    manifest = read_json(path / MANIFEST, format)
    if manifest.get("format") != format:
        raise ArtifactError(f"{path / MANIFEST}: format is {manifest.get('format')!r}, expected {format!r}")
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{path}: {name} is missing (the {format} is incomplete)")
        size = file.stat().st_size
        if size != expected["size"]:
            raise ArtifactError(f"{file} has {size:,} bytes, the manifest says {expected['size']:,}: it is not the "
                                f"file this {format} was written with")
        check = _full_digest(file) if full or size <= FULL_HASH_LIMIT else _sample_digest(file, size)
        if check != expected["sha256" if full or size <= FULL_HASH_LIMIT else "sample"]:
            raise ArtifactError(f"{file} is not the file this {format} was written with (its hash differs from "
                                f"{path / MANIFEST}): it was changed or replaced; make the {format} again")
    return manifest


def remove_artifact(path: str | os.PathLike, format: str) -> None:
    """Delete a folder, but only one this project committed as an artifact of ``format``: first renamed to a
    temporary name (one step), then removed, so a kill midway leaves no half artifact under its own name."""
    path = Path(path)
    if not is_artifact(path, format):
        raise ArtifactError(f"refusing to delete {path}: it is not a {format} made by this tool")
    doomed = temp_path(path)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def clean_temporaries(folder: str | os.PathLike) -> int:
    """Remove what interrupted writes left in ``folder`` (only this module's hidden temporary names)."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for leftover in folder.glob(".*.tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
        removed += 1
    return removed
