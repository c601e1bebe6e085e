"""Writing and reading what the tools make, safely.

A file is written under a temporary name, flushed to disk and renamed into place (:func:`atomic_write`); a folder
of files is committed as one unit (:func:`write_folder`): its files are written into a temporary sibling folder,
then ``manifest.json`` (the format, every file's size and hashes, and the records that bind the artifact to the
encoder and data it was made from) is written last, then one rename puts the folder in place. A folder is only
ever replaced when it is an artifact of the same format, so a user's folder is never deleted or overwritten.
:func:`read_manifest` checks the format and every file before anything is used.

Nothing is deleted on the strength of its name alone: a temporary folder, a working folder (:func:`owned_folder`)
and an output file (:func:`record_written`) carry the tool's own mark (a marker file inside, or the hash of what
was written), checked before removal or replacement, and a symbolic link is never followed to delete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from clip4cir.core.errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OWNER_MARK = ".clip4cir-owner.json"  # inside every folder the tools made and may delete (temporary or working)
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


def resolve(path: str | os.PathLike) -> Path:
    """An output path with its symbolic links resolved: writing replaces what a link points to and keeps the
    link (a link loop is an error naming it)."""
    try:
        return Path(os.path.realpath(path, strict=False))
    except OSError as e:
        raise ArtifactError(f"cannot resolve {path}: {e}") from None


def _pid_of(leftover: Path, tag: str) -> int | None:
    """The process id in a temporary name ``.NAME.TAG-PID-RANDOM``."""
    pid = leftover.name.rsplit(f".{tag}-", 1)[-1].split("-")[0]
    return int(pid) if pid.isdigit() else None


def clean_stale_temporaries(path: Path) -> int:
    """Remove the temporaries that writes of ``path`` left when they were killed (``.NAME.tmp-PID-*`` of a process
    that is no longer running); returns how many."""
    removed = 0
    for leftover in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        pid = _pid_of(leftover, "tmp")
        if pid is None or pid == os.getpid() or _alive(pid):  # this process's may be in the making (threads)
            continue
        if leftover.is_symlink() or (leftover.is_dir() and not (_marked(leftover, "temporary")
                                                                 or _complete_unlisted(leftover)
                                                                 or _cut_short(leftover))):
            continue  # not something a write of this tool left (a user's folder or link under such a name)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def _cut_short(folder: Path) -> bool:
    """Whether ``folder`` was killed while this tool made it: empty, or holding only its mark, written in part."""
    return all(entry.name == OWNER_MARK and entry.is_file() and not entry.is_symlink()
               and entry.stat().st_size < 256 for entry in folder.iterdir())


def _marked(folder: Path, role: str) -> bool:
    """Whether ``folder`` (a real folder, not a link) carries the mark this project puts in folders it makes for
    ``role`` ("temporary", "encoding"), so that it may delete them."""
    if folder.is_symlink() or not folder.is_dir() or (folder / OWNER_MARK).is_symlink():
        return False
    try:
        return read_json(folder / OWNER_MARK, "owner mark").get("role") == role
    except ArtifactError:
        return False


def _complete_unlisted(folder: Path) -> bool:
    """A folder artifact this tool finished but a kill kept from its rename (its mark already taken off): a
    manifest of the tool's and no file it does not list."""
    return (folder / MANIFEST).is_file() and "format" in _manifest_or_empty(folder) and not foreign_files(folder)


def _manifest_or_empty(folder: Path) -> dict:
    try:
        return read_json(folder / MANIFEST, "artifact")
    except ArtifactError:
        return {}


def _mark(folder: Path, role: str) -> None:
    (folder / OWNER_MARK).write_text(json.dumps({"written_by": "clip4cir", "role": role}), encoding="utf-8")


def make_temporary_folder(path: Path) -> Path:
    """A new hidden temporary sibling folder of ``path``, marked as this tool's (see :func:`_marked`)."""
    tmp = temp_path(path)
    tmp.mkdir()
    _mark(tmp, "temporary")
    return tmp


def owned_folder(path: Path, role: str, flag: str = "--output") -> Path:
    """The working folder ``path`` of ``role``, made and marked now, or one this tool made before (its mark
    checked); ArtifactError, before any work, when something else has that name (a user's folder or file, or a
    symbolic link: never written through or deleted)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ArtifactError(f"{flag}: {path} is in the way (a {'link' if path.is_symlink() else 'file'} not made "
                            f"by this tool, where it keeps its {role} work): it is left untouched; move it or "
                            f"choose another {flag}")
    if path.is_dir():
        if not _marked(path, role):
            raise ArtifactError(f"{flag}: {path} exists and was not made by this tool (it keeps its {role} work "
                                f"under that name): it is left untouched; move it or choose another {flag}")
        return path
    path.mkdir(parents=True)
    _mark(path, role)
    return path


def remove_owned_folder(path: Path, role: str, allowed: Callable[[str], bool]) -> None:
    """Delete a working folder this tool made (:func:`owned_folder`): only when it carries the mark and holds
    nothing but the marker and files ``allowed`` names (at any depth, no links); else ArtifactError, nothing
    deleted."""
    if not _marked(path, role):
        raise ArtifactError(f"refusing to delete {path}: it does not carry this tool's mark")
    foreign = [p.relative_to(path).as_posix() for p in path.rglob("*")
               if p.is_symlink() or (p.is_file() and p.name != OWNER_MARK and not allowed(p.name))]
    if foreign:
        raise ArtifactError(f"keeping {path}: it holds files this tool did not write "
                            f"({', '.join(sorted(foreign)[:5])})")
    shutil.rmtree(path)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)``, flush it to disk, then rename it onto ``path``: a crash never leaves half a file."""
    path = resolve(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder; expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
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
    """Whether another process with this id runs (what this process left behind counts as abandoned)."""
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
    for old in sorted(path.parent.glob(f".{glob_escape(path.name)}.old-*")):
        pid = _pid_of(old, "old")
        if pid is not None and _alive(pid):
            continue
        if not path.exists() and (old / MANIFEST).is_file():
            os.replace(old, path)
        elif path.exists() and not old.is_symlink() and (old / MANIFEST).is_file():
            shutil.rmtree(old, ignore_errors=True)


def is_artifact(path: str | os.PathLike, format: str) -> bool:
    """Whether ``path`` is a folder this project committed as an artifact of ``format``."""
    path = Path(path)
    _recover(path)
    try:
        return read_json(path / MANIFEST, format).get("format") == format
    except ArtifactError:
        return False


def foreign_files(path: Path) -> list[str]:
    """The files inside an artifact folder that its manifest does not list (a user's, put there later)."""
    try:
        listed = set(read_json(path / MANIFEST, "artifact").get("files", {})) | {MANIFEST, OWNER_MARK}
    except ArtifactError:
        return []
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(path).as_posix() not in listed)


def check_destination(path: str | os.PathLike, format: str, flag: str = "--output") -> Path:
    """Refuse, before any work, to write an artifact where it would replace something else than an artifact of
    the same format that holds only files this tool wrote (a user's folder or file is never overwritten; an empty
    folder is fine). Returns the path to write, symbolic links resolved; clears what killed writes left there."""
    given, path = path, resolve(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise ArtifactError(f"{flag} {given}: {path.parent} is a file, not a folder")
    if path.parent.is_dir():
        clean_stale_temporaries(path)
    _recover(path)
    if not path.exists():
        return path
    if not path.is_dir():
        raise ArtifactError(f"{flag} {given} is a file; give a folder name for the {format}")
    if not any(path.iterdir()):
        return path
    if not is_artifact(path, format):
        raise ArtifactError(f"{flag} {given} already exists and is not a {format} made by this tool: it is left "
                            f"untouched; choose a new folder")
    extra = foreign_files(path)
    if extra:
        shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
        raise ArtifactError(f"{flag} {given} is a {format} made by this tool, but it also holds {len(extra)} file(s) "
                            f"the tool did not write ({shown}): replacing it would delete them; move them out, "
                            f"or choose a new folder")
    return path


def input_file(path: str | os.PathLike, what: str, error: type[Exception] = ArtifactError) -> Path:
    """A file the run reads, checked to be a regular file: one message for each way it is not (missing, a
    folder, a FIFO or device), naming it as ``what``."""
    path = Path(path)
    if not str(path).strip():
        raise error(f"{what}: the path is empty")
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if path.is_dir():
        raise error(f"{what} {path} is a folder; give the file")
    if not path.is_file():
        raise error(f"{what} {path} is not a regular file (a FIFO, socket or device?)")
    return path


def cache_dir() -> Path:
    """Where the tools keep what they may make again (caches, the record of the files they wrote):
    ``$CLIP4CIR_CACHE``, else ``~/.cache/clip4cir``."""
    return Path(os.environ.get("CLIP4CIR_CACHE") or Path.home() / ".cache" / "clip4cir")


def _written_record(path: Path) -> Path:
    return cache_dir() / "written" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def write_output_text(path: str | os.PathLike, text: str) -> None:
    """Write an output file atomically and record the hash of what was written, so that a later run replaces it
    only while it still holds exactly that (:func:`written_unchanged`)."""
    path = resolve(path)
    atomic_write_text(path, text)
    try:
        atomic_write_text(_written_record(path), json.dumps({"path": str(path), "sha256": _full_digest(path)}))
    except OSError as e:  # no writable cache: the file is written; replacing it later will need --overwrite
        log.warning("could not record the hash of %s (%s): replacing it later will need --overwrite", path, e)


def written_unchanged(path: Path) -> bool:
    """Whether ``path`` holds exactly what a tool of this project last wrote there (its recorded hash)."""
    try:
        return read_json(_written_record(path), "record").get("sha256") == _full_digest(path)
    except (ArtifactError, OSError):
        return False


def check_output_file(path: str | os.PathLike, flag: str, overwrite: bool = False,
                      inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Before the work whose result it will hold: refuse an output file that is one of the run's ``inputs``
    (flag: path; even with ``overwrite``), or that would replace a file that is not exactly what this project
    wrote there (a user's, or one edited since), unless ``overwrite``; its folder must exist. Returns the path to
    write, symbolic links resolved."""
    given, path = path, resolve(path)
    for input_flag, input_path in (inputs or {}).items():
        if input_path and resolve(input_path) == path:
            raise ArtifactError(f"{flag} {given} is also the {input_flag} this run reads: choose another name")
    if path.is_dir():
        raise ArtifactError(f"{flag} {given} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ArtifactError(f"{flag} {given}: the folder {path.parent} does not exist")
    if path.exists() and path.stat().st_size and not overwrite and not written_unchanged(path):
        raise ArtifactError(f"{flag} {given} exists and is not a file this tool wrote (or it was changed since): "
                            f"it is left untouched; choose another name, or pass --overwrite to replace it")
    return path


def check_distinct_outputs(outputs: dict[str, Path | None]) -> None:
    """Refuse two output flags naming the same file (one would replace the other)."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        if resolve(path) in seen:
            raise ArtifactError(f"{flag} and {seen[resolve(path)]} name the same file {path}: give each its own")
        seen[resolve(path)] = flag


def write_folder(path: str | os.PathLike, format: str, write: Callable[[Path], None],
                 records: dict | None = None, flag: str = "--output") -> dict:
    """Commit a folder artifact as one unit: ``write(tmp)`` fills a temporary folder, the manifest is written
    last, then one rename puts it at ``path`` (replacing only an artifact of the same format). Returns the
    manifest."""
    path = check_destination(path, format, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temporary_folder(path)
    try:
        write(tmp)
        files = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != OWNER_MARK):
            _fsync_file(file)
            files[file.relative_to(tmp).as_posix()] = file_record(file)
        manifest = {"format": format, "version": MANIFEST_VERSION, "files": files, **(records or {})}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        (tmp / OWNER_MARK).unlink()  # a kill from here on leaves a complete artifact, which _recover handles
        _fsync_dir(tmp)
        if path.is_dir() and any(path.iterdir()):  # an artifact of this format, only the tool's files (checked)
            check_destination(path, format, flag)  # again: a file may have been put there while this one was written
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
    if path.is_symlink() or not is_artifact(path, format):
        raise ArtifactError(f"refusing to delete {path}: it is not a {format} made by this tool")
    extra = foreign_files(path)
    if extra:
        raise ArtifactError(f"refusing to delete {path}: it holds files this tool did not write "
                            f"({', '.join(extra[:5])})")
    doomed = temp_path(path)
    os.replace(path, doomed)
    _mark(doomed, "temporary")  # a kill midway leaves a marked temporary, which the next write clears
    shutil.rmtree(doomed)


def clean_temporaries(folder: str | os.PathLike) -> int:
    """Remove what interrupted writes left in ``folder`` (this module's hidden temporary names, of processes that
    no longer run)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    names = {p.name.split(".tmp-", 1)[0][1:] for p in folder.glob(".*.tmp-*")}
    return sum(clean_stale_temporaries(folder / name) for name in names)
