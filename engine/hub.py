"""Where models come from: a local folder or a hub id, safetensors only, and a content fingerprint of a model folder.
Shared by the diffusion bases, the VLM and the evaluation models."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelError(ValueError):
    """A model cannot be found or is unsafe to load; the message says which and why."""


def resolve_transformers_model(name: str, extra_patterns: list[str] | None = None) -> Path:
    """The local directory of a single transformers model (a VLM, an evaluation model): a local directory with
    safetensors weights, or a hub id fetched without its pickled weights."""
    path = Path(name).expanduser()
    if path.exists():
        if not any(path.glob("*.safetensors")):
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            raise ModelError(f"{name}: no safetensors weights" + (f" (only pickles: {', '.join(pickles)})" if pickles else ""))
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelError(f"{name}: no such directory, and not a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors", *(extra_patterns or [])]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as err:
        raise ModelError(f"{name}: cannot fetch from the hub ({type(err).__name__}: {err})") from None


@lru_cache(maxsize=8)
def fingerprint(path: Path) -> str:
    """A content fingerprint of a model directory, the same on every node, without reading whole weight files."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}:{size}:".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
