"""Classifier-free-guided generation on a resident base model, one seed per image.

Each image's starting noise comes from its own generator, so an image is the same whatever batch it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from engine.models import BaseModel
from engine.settings import Settings


def make_scheduler(name: str, config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}")


def make_pipeline(base: BaseModel, scheduler: str):
    """A StableDiffusionPipeline over the base model's modules (shared, not copied): a LoRA on them shows up here."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=base.unet,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        scheduler=make_scheduler(scheduler, base.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_seed(subject_seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of one image, independent of batch size, batch composition and the worker that makes it."""
    return (subject_seed * 1_000_003 + prompt_index * 10_007 + image_index) % (2**63 - 1)


@torch.no_grad()
def generate(
    base: BaseModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: Settings,
    batch_size: int,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, `batch_size` at a time, with classifier-free guidance."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt is required")
    pipe = make_pipeline(base, settings.scheduler)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[start : start + batch_size]]
        latents = torch.stack(
            [
                torch.randn(
                    (base.unet.config.in_channels, settings.resolution // _vae_scale(base), settings.resolution // _vae_scale(base)),
                    generator=g,
                )
                for g in generators
            ]
        ).to(base.device)
        out = pipe(
            prompt=batch_prompts,
            negative_prompt=[settings.negative_prompt] * len(batch_prompts) if settings.negative_prompt else None,
            height=settings.resolution,
            width=settings.resolution,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            latents=latents,
            generator=generators,
            output_type="pil",
        )
        images.extend(out.images)
    return images


def _vae_scale(base: BaseModel) -> int:
    return 2 ** (len(base.vae.config.block_out_channels) - 1)
