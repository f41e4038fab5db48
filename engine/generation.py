"""Classifier-free-guided generation on a resident base model, one seed per image.

Each image's starting noise comes from its own generator, so an image is the same whatever batch it lands in.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine import storage
from engine.models import BaseModel
from engine.settings import Settings
from engine.subject import Subject


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
        with settings.autocast(base.device.type):  # bf16 on GPU by default; fp32 on CPU
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


@dataclass(frozen=True)
class PlannedImage:
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    name: str  # file name under the subject's images/ folder


def plan_subject_images(subject: Subject, settings: Settings) -> list[PlannedImage]:
    """Every image a subject's prompts ask for, each with its own seed and file name."""
    count = subject.num_images_per_prompt or settings.num_images_per_prompt
    return [
        PlannedImage(p, i, prompt, image_seed(subject.effective_seed, p, i), f"p{p:04d}-i{i:04d}.png")
        for p, prompt in enumerate(subject.prompts)
        for i in range(count)
    ]


def png_bytes(image: Image.Image, text: dict[str, str]) -> bytes:
    """PNG with its generation parameters in tEXt chunks, readable by any PNG tool."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def render_subject(base: BaseModel, subject: Subject, settings: Settings, images_dir: str) -> list[dict]:
    """Generate the subject's missing images into `images_dir` with whatever weights `base` carries now.

    Returns one row per planned image (existing ones included), in the columns of SPEC's generations.parquet.
    Images already present are skipped, so a retried or resumed subject never renders one twice.
    """
    planned = plan_subject_images(subject, settings)
    present = set(storage.listdir(images_dir))
    missing = [p for p in planned if p.name not in present]
    batch = settings.generation_batch_size
    for start in range(0, len(missing), batch):
        chunk = missing[start : start + batch]
        images = generate(base, [p.prompt for p in chunk], [p.seed for p in chunk], settings, batch)
        for item, image in zip(chunk, images):
            text = {
                "prompt": item.prompt, "negative_prompt": settings.negative_prompt, "seed": str(item.seed),
                "num_inference_steps": str(settings.num_inference_steps), "guidance_scale": str(settings.guidance_scale),
                "scheduler": settings.scheduler, "subject_id": subject.subject_id,
            }  # fmt: skip
            storage.write_bytes(storage.join(images_dir, item.name), png_bytes(image, text))
    return [
        {
            "id": f"{subject.subject_id}/{p.name.removesuffix('.png')}",
            "subject_id": subject.subject_id,
            "prompt": p.prompt,
            "prompt_index": p.prompt_index,
            "image_index": p.image_index,
            "seed": p.seed,
            "image": storage.join(images_dir, p.name),
            "guidance_scale": settings.guidance_scale,
            "num_inference_steps": settings.num_inference_steps,
            "scheduler": settings.scheduler,
        }
        for p in planned
    ]
