"""A subject's training examples, prepared once: instance and class images as cached VAE latent distributions,
prompts as token ids and, while the text encoders are frozen, as cached embeddings.

Encoding happens here a single time; every training step only samples from the cache. How latents are scaled and
laid out, and how a prompt becomes conditioning, is the base family's (engine/diffusion/family.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.diffusion.base_model import BaseModel
from engine.diffusion.families import family_of
from engine.diffusion.family import PromptEmbeddings
from engine.media.images import read_image, resize_and_crop
from engine.settings import Settings


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 RGB → CHW float in [-1, 1], the range Stable Diffusion's VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_pixels(uris: Sequence[str], settings: Settings) -> torch.Tensor:
    """Images at `uris` as one [N, 3, R, R] tensor in [-1, 1]; an undecodable image raises ImageError naming it."""
    images = [read_image(uri, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side) for uri in uris]
    return torch.stack([to_tensor(resize_and_crop(im, settings.resolution, settings.center_crop)) for im in images])


@dataclass
class LatentPool:
    """Mean and std of each image's VAE posterior; a step draws a fresh latent from them, as encoding would."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[indices], self.std[indices]
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return mean + std * noise

    def __len__(self) -> int:
        return self.mean.shape[0]


@torch.no_grad()
def encode_latents(base: BaseModel, pixels: torch.Tensor, batch_size: int = 8) -> LatentPool:
    means, stds = [], []
    family = family_of(base)
    for start in range(0, pixels.shape[0], batch_size):
        dist = base.vae.encode(pixels[start : start + batch_size].to(base.device)).latent_dist
        mean, std = family.latent_moments(base, dist)  # in the layout and scale the denoiser trains on
        means.append(mean)
        stds.append(std)
    return LatentPool(torch.cat(means), torch.cat(stds))


@dataclass
class TrainingExamples:
    instance: LatentPool
    # Each instance photo's prompt, as a row of `instance_ids` and of the cached "instance" embeddings: the distinct
    # prompts are encoded once (a fixed instance prompt: one row, which every photo uses)
    instance_prompt_of: torch.Tensor  # [photos], int64
    instance_ids: tuple[torch.Tensor, ...]  # [prompts, L] per text encoder, where they can train (`Family.tokenize`)
    class_: LatentPool | None
    class_ids: tuple[torch.Tensor, ...] | None
    cached_embeddings: dict[str, PromptEmbeddings] | None  # "instance" (and "class"); None while text encoders train


def prepare_examples(
    base: BaseModel,
    instance_uris: Sequence[str],
    instance_prompts: Sequence[str],
    settings: Settings,
    class_uris: Sequence[str] | None = None,
    class_prompt: str | None = None,
) -> TrainingExamples:
    """Cache a subject's examples; `instance_prompts` holds each instance photo's own prompt, in order."""
    if len(instance_prompts) != len(instance_uris):
        raise ValueError(f"{len(instance_prompts)} instance prompts for {len(instance_uris)} instance images")
    family = family_of(base)
    instance = encode_latents(base, load_pixels(instance_uris, settings))
    prompts = list(dict.fromkeys(instance_prompts))
    prompt_of = torch.tensor([prompts.index(p) for p in instance_prompts], dtype=torch.long)
    instance_ids = tuple(torch.cat(per_encoder) for per_encoder in zip(*(family.tokenize(base, p, settings)
                                                                          for p in prompts)))  # fmt: skip
    class_pool = class_ids = None
    if class_uris:
        class_pool = encode_latents(base, load_pixels(class_uris, settings))
        class_ids = family.tokenize(base, class_prompt or "", settings)
    cached = None
    if not settings.train_text_encoder:
        with torch.no_grad(), base.text_encoders_on_device():  # parked on the CPU while a pack trains
            cached = {"instance": family.encode(base, prompts, settings)}
            if class_ids is not None:
                cached["class"] = family.encode(base, [class_prompt or ""], settings)
    return TrainingExamples(instance, prompt_of, instance_ids, class_pool, class_ids, cached)
