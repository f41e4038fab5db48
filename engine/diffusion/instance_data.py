"""A subject's training examples, prepared once: instance and class images as cached VAE latent distributions,
prompts as token ids and, while the text encoders are frozen, as cached embeddings.

Encoding happens here a single time; every training step only samples from the cache. `encode_prompts` is the one
place a prompt becomes UNet conditioning, for SD 1.x/2.x and SDXL alike, cached here or (text encoders training)
in every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.diffusion.base_model import BaseModel
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
    scale = base.vae.config.scaling_factor
    for start in range(0, pixels.shape[0], batch_size):
        dist = base.vae.encode(pixels[start : start + batch_size].to(base.device)).latent_dist
        means.append(dist.mean * scale)
        stds.append(dist.std * scale)
    return LatentPool(torch.cat(means), torch.cat(stds))


def tokenize(base: BaseModel, prompt: str) -> tuple[torch.Tensor, ...]:
    """The prompt's token ids [1, max_length] for each text encoder, in `base.text_encoder_names` order."""
    return tuple(
        tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(base.device)
        for tokenizer in base.tokenizers
    )


@dataclass
class PromptEmbeddings:
    """What the UNet is conditioned on by a batch of prompts: per-token hidden states and, for SDXL, the pooled
    embedding (text_encoder_2's projection), which the UNet takes with the size/crop time ids."""

    hidden: torch.Tensor  # [n, tokens, cross_attention_dim]
    pooled: torch.Tensor | None  # [n, projection_dim]; None for SD 1.x/2.x

    def split(self) -> list[PromptEmbeddings]:
        """One PromptEmbeddings per prompt of the batch."""
        pooled = self.pooled.split(1) if self.pooled is not None else [None] * self.hidden.shape[0]
        return [PromptEmbeddings(h, p) for h, p in zip(self.hidden.split(1), pooled)]

    def expand(self, n: int) -> PromptEmbeddings:
        """One prompt's embeddings as n rows (views, not copies): one per sample conditioned on it."""
        pooled = self.pooled.expand(n, -1) if self.pooled is not None else None
        return PromptEmbeddings(self.hidden.expand(n, -1, -1), pooled)

    @staticmethod
    def cat(parts: Sequence[PromptEmbeddings]) -> PromptEmbeddings:
        pooled = [p.pooled for p in parts]
        hidden = torch.cat([p.hidden for p in parts])
        return PromptEmbeddings(hidden, torch.cat(pooled) if pooled[0] is not None else None)


def encode_prompts(base: BaseModel, ids: tuple[torch.Tensor, ...]) -> PromptEmbeddings:
    """Token ids (one tensor [n, L] per text encoder) through the text encoders, as diffusers' pipelines encode:
    SD 1.x/2.x the last hidden states; SDXL both encoders' penultimate hidden states side by side, and the pooled
    projection of the second."""
    if not base.is_sdxl:
        return PromptEmbeddings(base.text_encoder(ids[0])[0], None)
    hidden, pooled = [], None
    for name, tokens in zip(base.text_encoder_names, ids):
        out = getattr(base, name)(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def add_time_ids(resolution: int, n: int, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning for n samples: original size, crop top-left, target size, [n, 6].

    Every example is resized and cropped to `resolution` before its latents are cached, and generation asks for that
    size uncropped (the pipeline's default), so each sample is conditioned on what generation will ask for: (R, R),
    (0, 0), (R, R). diffusers' train_dreambooth_lora_sdxl.py has used both these fixed values and each photo's own
    size and crop."""
    values = [resolution, resolution, 0, 0, resolution, resolution]
    return torch.tensor([values], dtype=torch.float32, device=device).repeat(n, 1)


def unet_added_conditions(embeddings: Sequence[PromptEmbeddings], resolutions: Sequence[int]) -> dict | None:
    """The UNet's `added_cond_kwargs` for consecutive batches of embeddings, each trained at its resolution: SDXL's
    pooled embeddings and time ids; None for SD 1.x/2.x (no pooled embeddings), whose UNet takes none."""
    if embeddings[0].pooled is None:
        return None
    time_ids = [add_time_ids(r, len(e.hidden), e.hidden.device) for e, r in zip(embeddings, resolutions)]
    return {"text_embeds": torch.cat([e.pooled for e in embeddings]), "time_ids": torch.cat(time_ids)}


@dataclass
class TrainingExamples:
    instance: LatentPool
    instance_ids: tuple[torch.Tensor, ...]  # one per text encoder (see `tokenize`)
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
    instance = encode_latents(base, load_pixels(instance_uris, settings))
    instance_ids = tokenize(base, instance_prompt)
    class_pool = class_ids = None
    if class_uris:
        class_pool = encode_latents(base, load_pixels(class_uris, settings))
        class_ids = tokenize(base, class_prompt or "")
    cached = None
    if not settings.train_text_encoder:
        with torch.no_grad():
            cached = {"instance": encode_prompts(base, instance_ids)}
            if class_ids is not None:
                cached["class"] = encode_prompts(base, class_ids)
    return TrainingExamples(instance, instance_ids, class_pool, class_ids, cached)
