"""What every offline tiny model shares: the cache they are built into, building each once (atomically), and the
character-level CLIP tokenizer and text-encoder config built in code."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_cache_dir() -> Path:
    # An empty value means unset: Path("") is the working directory, where builds would land among the user's files.
    return Path(os.environ.get("DREAMFLEET_CACHE") or Path.home() / ".cache" / "dreamfleet")


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_clip_tokenizer(model_max_length: int = 77):
    """A character-level CLIP tokenizer: every byte symbol, with and without `</w>`, and no merges."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, pad_token="<|endoftext|>")


def tiny_clip_config(tokenizer, hidden_size: int = 32, **overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def build_once(path: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """`path`, built by `build(staging_dir)` on first use, then renamed into place: concurrent callers (fleet
    workers starting together) never see a half-written model, and the loser of a race keeps the winner's copy."""
    if (path / marker).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(staging)
        try:
            staging.rename(path)
        except OSError:  # another process finished first; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def ensure_pipeline(name: str, version: int, build: Callable[[Path, int], None], cache_dir: Path | None, seed: int) -> Path:
    """The tiny diffusers pipeline `name` of `seed` in the cache (default: `default_cache_dir()`), built by
    `build(staging, seed)` on first use; `version` is in the folder's name, so a changed build is never taken from a
    stale cache."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(root / f"{name}-v{version}-seed{seed}", "model_index.json", lambda staging: build(staging, seed))
