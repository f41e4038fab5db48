"""The `tiny-prior` base model: a tiny Stable Diffusion briefly pretrained on drawn shapes, so it has a class prior.

The `tiny` base is random: it has no prior for prior preservation to keep, and its random text encoder hardly tells
prompts apart. tiny-prior is built, deterministically and offline, to have one.

Dataset: four classes drawn with PIL (`CLASSES`: ball, box, star, ring), captioned "a photo of a <class>"
(`draw_class_image`, `class_prompt`). Each instance is a flat shape in its class's band of hues (`HUES`), of
random saturation, brightness, size and offset, on a plain background of another random hue. Every batch is drawn
fresh from the seed, so nothing is stored.

Architecture: tiny SD's UNet, text encoder and tokenizer, but a VAE that downsamples 4x (8x8x4 latents at 32 px,
not 16x16x4). That makes a denoiser step about 4x cheaper, and it is what let the build learn the classes in a
CPU minute.

Training, on 1 CPU thread (fixed, so a seed gives the same bytes):
1. the VAE as an autoencoder of the shapes, so its decodings are images and pixel distances mean something;
2. the text encoder's five prompts pushed apart (at random initialisation they are nearly equal);
3. UNet and text encoder together as a v-prediction denoiser, with 10 % of prompts dropped to "" so classifier-free
   guidance has an unconditional model. v-prediction because at high noise its target is the image, which a
   briefly trained model learns sooner. The engine and stock diffusers read `prediction_type` from the scheduler
   config.

What it costs and learns (the project's 2-core box, under light load from another job):
- Builds take 66 s with 500 denoiser steps and 86 s with 800 (the setting). Two builds of a seed give identical
  safetensors bytes.
- Each class prompt draws its own class: its images are, on average, nearer its own class's drawn instances than any
  other class's (tests/engine/test_tiny_prior.py).
- The earlier 16x16-latent build learned no prompt conditioning in 90 s, even with shape-only classes (~8 min
  were needed); see bench/RESULTS.md.
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from engine.library_logging import quiet_libraries
from engine.tiny.common import build_clip_tokenizer, ensure_pipeline, tiny_clip_config
from engine.tiny.sd import sd_scheduler

# Bump when the dataset, the training or its length changes, so stale caches are rebuilt rather than reused.
TINY_PRIOR_VERSION = 1

CLASSES = ("ball", "box", "star", "ring")
# Each class's shapes come in its own band of hues (warm balls, green boxes, blue stars, purple rings): a colour is a
# global feature a tiny denoiser learns to take from the prompt within a CPU minute, where shape alone took ~8 min.
HUES = {"ball": 0.08, "box": 0.33, "star": 0.6, "ring": 0.83}
HUE_SPREAD = 0.08
RESOLUTION = 32  # the tiny preset's resolution
RADIUS, JITTER = (0.28, 0.4), 0.08  # shape radius and centre offset, as fractions of the side
EMPTY_PROMPT_RATE = 0.1
PREDICTION = "v_prediction"
BUILD_THREADS = 1  # fixed, so a seed gives the same weights whatever the machine's default thread count

VAE_STEPS, VAE_BATCH, VAE_LR = 130, 16, 2e-3
SEPARATE_STEPS, SEPARATE_LR = 60, 1e-2
DENOISER_STEPS, DENOISER_BATCH, DENOISER_LR = 800, 16, 2e-3
POOL_PER_CLASS = 64  # images per class encoded once, which the denoiser samples latents from


def class_prompt(name: str) -> str:
    return f"a photo of a {name}"


def _colour(rng: random.Random, hue: float, value: tuple[float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.55, 1.0), rng.uniform(*value))
    return round(r * 255), round(g * 255), round(b * 255)


def draw_class_image(name: str, rng: random.Random, size: int = RESOLUTION) -> Image.Image:
    """One instance of class `name`: a flat shape of random colour, size and offset from the centre, on a plain
    background of a clearly different hue. Drawn at twice the size and box-filtered down, for smooth edges."""
    if name not in HUES:
        raise ValueError(f"unknown class {name!r}; the classes are {', '.join(CLASSES)}")
    big = 2 * size
    hue = HUES[name] + rng.uniform(-HUE_SPREAD, HUE_SPREAD)
    background = _colour(rng, hue + rng.uniform(0.3, 0.7), (0.35, 0.9))
    fill = _colour(rng, hue, (0.75, 1.0))
    radius = rng.uniform(RADIUS[0], RADIUS[1]) * big
    cx, cy = (big / 2 + rng.uniform(-JITTER, JITTER) * big for _ in range(2))
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    if name == "ball":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif name == "box":
        half = radius * 0.85
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif name == "star":
        turn = rng.uniform(0, 2 * math.pi / 5)
        points = [
            (cx + r * math.sin(turn + k * math.pi / 5), cy - r * math.cos(turn + k * math.pi / 5))
            for k, r in zip(range(10), [radius, radius * 0.45] * 5)
        ]
        draw.polygon(points, fill=fill)
    elif name == "ring":
        width = round(radius * rng.uniform(0.28, 0.4))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=fill, width=width)
    else:
        raise ValueError(f"unknown class {name!r}; the classes are {', '.join(CLASSES)}")
    return image.resize((size, size), Image.Resampling.BOX)


def draw_class_images(name: str, count: int, seed: int) -> list[Image.Image]:
    """`count` instances of class `name`, the same for the same seed."""
    rng = random.Random(seed)
    return [draw_class_image(name, rng) for _ in range(count)]


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images → [N, 3, H, W] in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _draw_batch(rng: random.Random, count: int) -> tuple[torch.Tensor, list[int]]:
    labels = [rng.randrange(len(CLASSES)) for _ in range(count)]
    return _to_tensor([draw_class_image(CLASSES[k], rng) for k in labels]), labels


def train_vae(vae, rng: random.Random) -> None:
    """The VAE as an autoencoder of the drawn shapes (MSE plus a light KL), so that its decoded latents are images."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    for _ in range(VAE_STEPS):
        pixels, _ = _draw_batch(rng, VAE_BATCH)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(vae, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    pixels, labels = _draw_batch(rng, POOL_PER_CLASS * len(CLASSES))
    posterior = vae.encode(pixels).latent_dist
    return posterior.mean, posterior.std, labels


def separate_prompts(text_encoder, ids: torch.Tensor) -> None:
    """Push the random text encoder's embeddings of the class prompts (and "") apart before the denoiser trains: at
    random initialisation they are nearly equal (cosine ~0.99), and the UNet learns to use the text far sooner when
    the prompts it must tell apart already look different. Cheap: five prompts, forward and backward."""
    text_encoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(text_encoder.parameters(), lr=SEPARATE_LR, weight_decay=0.0)
    for _ in range(SEPARATE_STEPS):
        hidden = F.normalize(text_encoder(ids)[0].flatten(1), dim=-1)
        similarity = hidden @ hidden.T
        loss = (similarity.sum() - similarity.diagonal().sum()) / (len(ids) * (len(ids) - 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _train_denoiser(pipe, rng: random.Random, generator: torch.Generator) -> None:
    """UNet and text encoder together as a text-conditional v-prediction denoiser on the VAE's latents."""
    from diffusers import DDPMScheduler

    pipe.scheduler.register_to_config(prediction_type=PREDICTION)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    mean, std, labels = encode_pool(pipe.vae, rng)
    scale = 1.0 / float(mean.std())
    pipe.vae.register_to_config(scaling_factor=scale)  # SD's recipe: latents of unit variance for the UNet
    prompts = [class_prompt(name) for name in CLASSES] + [""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    labels_t = torch.tensor(labels)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    separate_prompts(text_encoder, ids)
    for module in (unet, text_encoder):
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=DENOISER_LR, weight_decay=0.0)
    for _ in range(DENOISER_STEPS):
        rows = torch.randint(len(labels), (DENOISER_BATCH,), generator=generator)
        latents = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator)) * scale
        prompt_index = labels_t[rows].clone()
        prompt_index[torch.rand(DENOISER_BATCH, generator=generator) < EMPTY_PROMPT_RATE] = len(CLASSES)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (DENOISER_BATCH,), generator=generator)
        hidden = text_encoder(ids)[0][prompt_index]
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        target = scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)


def _start_pipeline(seed: int):
    """Tiny SD's components at random, but with a VAE that downsamples 4x rather than 2x: 8x8 latents at 32 px make
    each denoiser step ~4x cheaper (attention over 64 positions, not 256), which is what lets the build learn in a
    CPU minute."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )  # fmt: skip
        vae = AutoencoderKL(
            block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION,
        )  # fmt: skip
        text_encoder = CLIPTextModel(tiny_clip_config(tokenizer))
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def build_pretrained(
    path: Path, seed: int, start: Callable[[int], Any], pretrain: Callable[[Any, random.Random, torch.Generator], None]
) -> None:
    """Write a tiny pipeline pretrained on the drawn shapes at `path`: `start(seed)` makes it at random,
    `pretrain(pipe, rng, generator)` trains it. On BUILD_THREADS threads and with the global RNG seeded as well (the
    VAE's posterior sampling draws from it), so a seed gives the same bytes (tiny-prior and tiny-flux-prior)."""
    quiet_libraries()
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        pipe = start(seed)
        rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pretrain(pipe, rng, generator)
        pipe.save_pretrained(path, safe_serialization=True)
    finally:
        torch.set_num_threads(threads)


def _pretrain(pipe, rng: random.Random, generator: torch.Generator) -> None:
    train_vae(pipe.vae, rng)
    _train_denoiser(pipe, rng, generator)


def build_tiny_prior(path: Path, seed: int = 0) -> None:
    """Write the tiny-prior pipeline directory at `path`: tiny SD of `seed`, pretrained on the shapes."""
    build_pretrained(path, seed, _start_pipeline, _pretrain)


def ensure_tiny_prior(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny-prior directory in the cache, built on first use."""
    return ensure_pipeline("tiny-prior", TINY_PRIOR_VERSION, build_tiny_prior, cache_dir, seed)
