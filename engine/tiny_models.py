"""The `tiny` base models: small random-initialised models of the real architectures, built offline from a seed.

They are saved with `save_pretrained` and loaded back through the same `from_pretrained` path as real weights, so
tests and the demo exercise the real loading code without downloading anything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from engine.library_logging import quiet_libraries

# Bump when the architecture or construction changes, so stale caches are rebuilt rather than reused.
TINY_SD_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("DREAMFLEET_CACHE", Path.home() / ".cache" / "dreamfleet"))


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


def build_tiny_sd(path: Path, seed: int = 0) -> None:
    """Write a complete tiny Stable Diffusion 1.x pipeline directory at `path`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    quiet_libraries()
    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seed the weights without resetting the caller's random stream
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)


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


def ensure_tiny_sd(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny SD directory in the cache, built on first use."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(root / f"tiny-sd-v{TINY_SD_VERSION}-seed{seed}", "model_index.json",
                      lambda staging: build_tiny_sd(staging, seed=seed))  # fmt: skip
