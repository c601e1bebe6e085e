"""What an artifact was made from, as short hashes: the encoder (weights and preprocessing, see
``Encoder.fingerprint``) and the data (annotation files by content, image files by path, size and
modification time). Caches are keyed on them and artifacts record them, so a changed input is never served
from a stale result."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path


def digest(*parts) -> str:
    """A 16-hex-digit hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def contents(paths: Iterable[str | os.PathLike]) -> str:
    """Hash of the files' names and bytes (small files such as annotations)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_stats(paths: Iterable[str | os.PathLike]) -> str:
    """Hash of the files' absolute paths, sizes and modification times (image files: cheap for a whole
    catalog, and any replaced, edited or moved file changes it)."""
    h = hashlib.sha256()
    for path in paths:
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0<missing>\n".encode())
    return h.hexdigest()[:16]
