"""The `tiny` evaluation models: a small random DINO-style ViT and a small random CLIP, built offline from a seed.

The same architectures and file layouts as facebook/dino-vits16 (transformers ViTModel + its image processor) and
openai/clip-vit-large-patch14 (CLIPModel + CLIPProcessor), saved with `save_pretrained` and loaded back through the
same `from_pretrained` path, so the evaluation pass runs end to end without a download. Random weights score an
image against itself as 1 and against others lower, which is what the tests check; their numbers say nothing about
quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.library_logging import quiet_libraries
from engine.tiny.common import build_clip_tokenizer, build_once, default_cache_dir

TINY_EVAL_VERSION = 1
IMAGE_SIZE, PATCH_SIZE, WIDTH = 32, 8, 32
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINO's normalisation
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _vision_shape() -> dict:
    return {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_size": WIDTH, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 2 * WIDTH}  # fmt: skip


def build_tiny_dino(path: Path, seed: int = 0) -> None:
    """A ViT without pooler, as DINO checkpoints are: the evaluation reads its [CLS] token."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    quiet_libraries()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(ViTConfig(**_vision_shape()), add_pooling_layer=False)
    model.save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD).save_pretrained(path)  # fmt: skip


def build_tiny_clip(path: Path, seed: int = 0) -> None:
    """A CLIP with both towers and their projections, and a processor holding the tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    quiet_libraries()
    tokenizer = build_clip_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": WIDTH, "intermediate_size": 2 * WIDTH, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    config = CLIPConfig(text_config=text, vision_config=_vision_shape(), projection_dim=WIDTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(path, safe_serialization=True)
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                image_mean=CLIP_MEAN, image_std=CLIP_STD)  # fmt: skip
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)


def ensure_tiny_eval_model(kind: str, cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny `kind` ("dino" or "clip") directory in the cache, built on first use."""
    build = {"dino": build_tiny_dino, "clip": build_tiny_clip}[kind]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(root / f"tiny-{kind}-v{TINY_EVAL_VERSION}-seed{seed}", "config.json",
                      lambda staging: build(staging, seed=seed))  # fmt: skip
