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
    instance_ids: tuple[torch.Tensor, ...]  # one per text encoder, where they can train (see `Family.tokenize`)
    class_: LatentPool | None
    class_ids: tuple[torch.Tensor, ...] | None
    cached_embeddings: dict[str, PromptEmbeddings] | None  # "instance" (and "class"); None while text encoders train


def prepare_examples(
    base: BaseModel,
    instance_uris: Sequence[str],
    instance_prompt: str,
    settings: Settings,
    class_uris: Sequence[str] | None = None,
    class_prompt: str | None = None,
) -> TrainingExamples:
    family = family_of(base)
    instance = encode_latents(base, load_pixels(instance_uris, settings))
    instance_ids = family.tokenize(base, instance_prompt, settings)
    class_pool = class_ids = None
    if class_uris:
        class_pool = encode_latents(base, load_pixels(class_uris, settings))
        class_ids = family.tokenize(base, class_prompt or "", settings)
    cached = None
    if not settings.train_text_encoder:
        with torch.no_grad(), base.text_encoders_on_device():  # parked on the CPU while a pack trains
            cached = {"instance": family.encode(base, [instance_prompt], settings)}
            if class_ids is not None:
                cached["class"] = family.encode(base, [class_prompt or ""], settings)
    return TrainingExamples(instance, instance_ids, class_pool, class_ids, cached)
