"""Paths the app is given that live on the Hugging Face Hub: ``hf://OWNER/REPO/PATH``, a file or folder of a model
repository, downloaded into the app's cache (with the ``HF_TOKEN`` of a Space, when one is set)."""
from __future__ import annotations

from pathlib import Path

from clip4cir.core.errors import ModelError


def resolve_path(spec: str | None, cache: Path) -> str | None:
    """A local path as is; ``hf://OWNER/REPO/PATH`` downloaded from the Hugging Face Hub (file or folder)."""
    if not spec or not spec.startswith("hf://"):
        return spec
    parts = spec[len("hf://"):].split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{spec!r}: expected hf://OWNER/REPO/PATH")
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo, allow_patterns=[path, f"{path}/*"], cache_dir=str(cache / "hub"))
    except Exception as e:
        raise ModelError(f"could not download {spec} from the Hugging Face Hub (offline?): {e}") from e
    local = Path(folder) / path
    if not local.exists():
        raise ModelError(f"{spec}: no such file or folder in {repo}")
    return str(local)
