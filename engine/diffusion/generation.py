"""Generation on a resident base model through its stock pipeline (SD 1.x/2.x, SDXL: classifier-free guidance over
the chosen scheduler; FLUX.1 [dev]: guidance embedding, no negative prompt; FLUX.2 [klein]: true CFG, both halves in
one transformer call; both FLUX with FlowMatch Euler at the resolution-dependent shift), one seed per image, several
subjects per batch.

Each image's starting noise comes from its own generator, so an image is the same whatever batch it lands in.
With a LoRA pack on the model (engine/packed_lora.py), each image of a batch (both of its CFG halves, and its
prompt through trained text encoders) goes through its own subject's slot: `render_pack` renders many subjects
in shared UNet batches, and each image equals its unpacked rendering within rounding.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine import storage
from engine.diffusion.base_model import BaseModel
from engine.diffusion.families import family_of
from engine.diffusion.subject import Subject
from engine.settings import Settings

# The columns of a generated image's row: each subject's generations.parquet, and the run's (ray_jobs/state).
ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # subject_id/file stem: makes this table an images manifest for `dreamfleet analyze`
        ("subject_id", pa.string()),
        ("prompt", pa.string()),
        ("prompt_index", pa.int32()),
        ("image_index", pa.int32()),
        ("seed", pa.int64()),
        ("image", pa.string()),
        ("guidance_scale", pa.float64()),
        ("num_inference_steps", pa.int32()),
        ("scheduler", pa.string()),
    ]
)


def make_pipeline(base: BaseModel, settings: Settings):
    """The base model's stock pipeline over its modules, shared, not copied: a LoRA on them shows up here."""
    return family_of(base).pipeline(base, settings)


# Settings the subjects rendered in one batch must share (with the LoRA layout, see engine/train.PACK_SHAPE_KEYS).
RENDER_SHAPE_KEYS = (
    "mode", "lora_rank", "lora_target_modules", "text_encoder_lora_target_modules", "train_text_encoder",
    "resolution", "num_inference_steps", "guidance_scale", "scheduler", "negative_prompt", "generation_batch_size",
    "mixed_precision", "max_sequence_length",
)  # fmt: skip


def render_shape(settings: Settings) -> tuple:
    """Subjects whose settings give equal render shapes can share UNet batches."""
    return tuple(str(getattr(settings, key)) for key in RENDER_SHAPE_KEYS)


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
    slots: Sequence[int] | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, `batch_size` at a time, with classifier-free guidance; with `slots`, image
    i goes through LoRA slot `slots[i]` of the base model's pack."""
    if len(prompts) != len(seeds) or (slots is not None and len(slots) != len(prompts)):
        raise ValueError("one seed (and one slot, if any) per prompt is required")
    family = family_of(base)
    family.check(base, settings)  # e.g. a FLUX resolution off its patch grid: refused, not rendered at another size
    family.check_rendering(base, settings)
    pipe = family.pipeline(base, settings)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        batch_slots = list(slots[start : start + batch_size]) if slots is not None else None
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[start : start + batch_size]]
        images.extend(family.render(base, pipe, list(prompts[start : start + batch_size]), generators, settings,
                                    batch_slots))  # fmt: skip
    return images


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


@dataclass(frozen=True)
class RenderJob:
    """One subject of a packed rendering: its prompts and seeds, where its images go, and its LoRA slot."""

    subject: Subject
    settings: Settings
    images_dir: str
    slot: int = 0


def render_pack(base: BaseModel, jobs: Sequence[RenderJob]) -> dict[str, list[dict]]:
    """Generate the jobs' missing images into their folders, in UNet batches shared across subjects, each image
    through its own subject's slot (the jobs share one render shape; the first's settings drive the pipeline).

    Returns each subject's rows (existing images included), in the columns of SPEC's generations.parquet. Images
    already present are skipped, so a retried or resumed subject never renders one twice.
    """
    settings = jobs[0].settings
    sampler = family_of(base).sampler(settings)  # what the rows and PNGs record: FLUX samples with its own
    missing = []
    for job in jobs:
        present = set(storage.listdir(job.images_dir))
        missing += [(job, p) for p in plan_subject_images(job.subject, job.settings) if p.name not in present]
    batch = settings.generation_batch_size
    for start in range(0, len(missing), batch):
        chunk = missing[start : start + batch]
        slots = [job.slot for job, _ in chunk] if base.lora is not None else None
        images = generate(base, [p.prompt for _, p in chunk], [p.seed for _, p in chunk], settings, batch, slots)
        for (job, item), image in zip(chunk, images):
            text = {
                "prompt": item.prompt, "negative_prompt": settings.negative_prompt, "seed": str(item.seed),
                "num_inference_steps": str(settings.num_inference_steps), "guidance_scale": str(settings.guidance_scale),
                "scheduler": sampler, "subject_id": job.subject.subject_id,
            }  # fmt: skip
            storage.write_bytes(storage.join(job.images_dir, item.name), png_bytes(image, text))
    return {job.subject.subject_id: _rows(job, sampler) for job in jobs}


def render_subject(base: BaseModel, subject: Subject, settings: Settings, images_dir: str) -> list[dict]:
    """`render_pack` of one subject, with whatever weights `base` carries now (LoRA: slot 0)."""
    return render_pack(base, [RenderJob(subject, settings, images_dir)])[subject.subject_id]


def _rows(job: RenderJob, sampler: str) -> list[dict]:
    subject, settings = job.subject, job.settings
    return [
        {
            "id": f"{subject.subject_id}/{p.name.removesuffix('.png')}",
            "subject_id": subject.subject_id,
            "prompt": p.prompt,
            "prompt_index": p.prompt_index,
            "image_index": p.image_index,
            "seed": p.seed,
            "image": storage.join(job.images_dir, p.name),
            "guidance_scale": settings.guidance_scale,
            "num_inference_steps": settings.num_inference_steps,
            "scheduler": sampler,
        }
        for p in plan_subject_images(subject, settings)
    ]
