"""Paths the app is given that live on the Hugging Face Hub: ``hf://OWNER/REPO/PATH``, a file or folder of a model
repository, downloaded into the app's cache, with the ``HF_TOKEN`` of a Space (or the environment) when one is
set: a private repository works, and the token never appears in a message."""
from __future__ import annotations

import os
from pathlib import Path

from clip4cir.core.errors import ModelError

PREFIX = "hf://"


def scrubbed(text: str, secret: str | None) -> str:
    """``text`` with the secret (a token) replaced, wherever a library put it."""
    return text.replace(secret, "<HF_TOKEN>") if secret else text


def resolve_path(spec: str | None, cache: Path) -> str | None:
    """A local path as is; ``hf://OWNER/REPO/PATH`` downloaded from the Hugging Face Hub (file or folder). A failed
    download is one ModelError that says what could not be fetched and why (offline, no such repository, no
    access)."""
    if not spec or not spec.startswith(PREFIX):
        return spec
    parts = spec[len(PREFIX):].split("/")
    if len(parts) < 3 or not all(parts):
        raise ModelError(f"{spec!r}: expected hf://OWNER/REPO/PATH (a file or folder of a model repository)")
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    token = os.environ.get("HF_TOKEN") or None
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo, allow_patterns=[path, f"{path}/*"], cache_dir=str(cache / "hub"),
                                   token=token)
    except Exception as e:  # the hub's errors are many; each becomes one line
        reason = scrubbed(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, token)
        hint = "" if token else " (a private repository needs the HF_TOKEN secret)"
        raise ModelError(f"could not download {spec} from the Hugging Face Hub{hint}: {type(e).__name__}: "
                         f"{reason}") from None
    local = Path(folder) / path
    if not local.exists():
        raise ModelError(f"{spec}: no such file or folder in {repo}")
    return str(local)
