"""Images per second of dreamfleet's generation stage against stock diffusers, on the `tiny` model, CPU.

Ours: `render_subject` on a resident `load_base_model("tiny")`, generation_batch_size 8: 4 prompts x 4 images =
16 images in 2 batches of 8 (classifier-free guidance makes each UNet batch 16), one seed per image, PNGs written
with their parameters. Stock, what a user writes: `StableDiffusionPipeline.from_pretrained(tiny)` called once per
prompt with num_images_per_prompt=4, and (a second baseline) once per image; PNGs saved. All sides: the tiny preset's
10 DDIM steps, CFG 7.5, 32 px, the same prompts, one process. Loading is outside the timings (a fleet worker and a
notebook user both load once). The sides run interleaved, --rounds times (ours, per prompt, per image), so a change
in the machine's load hits each alike; medians are reported, and the median of the per-round ratios.
Check: the largest pixel difference between our images at generation_batch_size 8 and at 1 (same seeds).

Prediction, written before measuring. All three sides do the same UNet and VAE FLOPs; they differ in how many
calls carry them: ours 20 UNet calls at batch 16, per prompt 40 at batch 8, per image 160 at batch 2 (about 460
aten ops each, overhead-bound at these shapes), plus per-call text encoding, scheduler set-up and VAE decode.
Ours builds a pipeline object per batch and draws 8 noise tensors from 8 generators, a few ms. I expect ours about
1.1-1.3x the per-prompt baseline and 2-3x the per-image one, and the batch-8 vs batch-1 pixel difference at most 1.

Run from the repo root (about a minute on 2 cores):
    .venv/bin/python bench/generation_vs_stock.py [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from engine.diffusion.base_model import BaseModel, load_base_model, resolve_base_model  # noqa: E402
from engine.diffusion.generation import render_subject  # noqa: E402
from engine.diffusion.subject import Subject  # noqa: E402
from engine.library_logging import quiet_libraries  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402

PROMPTS = ("a photo of sks ball on grass", "a photo of sks ball in snow", "a photo of sks ball on a beach",
           "a painting of sks ball")  # fmt: skip
IMAGES_PER_PROMPT = 4
SEED = 11


def ours(base: BaseModel, subject: Subject, settings: Settings, folder: Path) -> list[str]:
    rows = render_subject(base, subject, settings, str(folder))
    return [r["image"] for r in rows]


def stock_pipeline(path: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock(pipe, settings: Settings, folder: Path, per_prompt: int) -> None:
    """The user's loop: `per_prompt` images per call (4: one call per prompt; 1: one call per image)."""
    folder.mkdir(parents=True, exist_ok=True)
    for p, prompt in enumerate(PROMPTS):
        for first in range(0, IMAGES_PER_PROMPT, per_prompt):
            images = pipe(
                prompt, num_images_per_prompt=per_prompt, num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale, height=settings.resolution, width=settings.resolution,
                generator=torch.Generator().manual_seed(SEED + 100 * p + first),
            ).images  # fmt: skip
            for i, image in enumerate(images):
                image.save(folder / f"p{p}-i{first + i}.png")


def timed(fn, *args) -> float:
    began = time.perf_counter()
    fn(*args)
    return time.perf_counter() - began


def max_pixel_difference(a: list[str], b: list[str]) -> int:
    return max(int(np.abs(np.asarray(Image.open(x), np.int16) - np.asarray(Image.open(y), np.int16)).max())
               for x, y in zip(a, b))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the first is warm-up, dropped")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()

    load_before = os.getloadavg()[0]
    path = resolve_base_model("tiny")
    base = load_base_model(path, "cpu")
    pipe = stock_pipeline(path)
    settings = load_settings("tiny", overrides={"num_images_per_prompt": IMAGES_PER_PROMPT, "generation_batch_size": 8})
    subject = Subject("ball", ("unused.png",), "a photo of sks ball", prompts=PROMPTS, seed=SEED)
    count = len(PROMPTS) * IMAGES_PER_PROMPT
    seconds: dict[str, list[float]] = {"ours": [], "stock, per prompt": [], "stock, per image": []}
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as work:
        for r in range(args.rounds):
            round_dir = Path(work) / str(r)  # a fresh folder each round: render_subject skips images already there
            seconds["ours"].append(timed(ours, base, subject, settings, round_dir / "ours"))
            seconds["stock, per prompt"].append(timed(stock, pipe, settings, round_dir / "prompt", IMAGES_PER_PROMPT))
            seconds["stock, per image"].append(timed(stock, pipe, settings, round_dir / "image", 1))
        batch8 = ours(base, subject, settings, Path(work) / "check-8")
        batch1 = ours(base, subject, settings.with_overrides({"generation_batch_size": 1}), Path(work) / "check-1")
        difference = max_pixel_difference(batch8, batch1)

    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {len(os.sched_getaffinity(0))} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} "
          f"torch thread(s), 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")  # fmt: skip
    print(f"tiny model, {count} images per side per round ({len(PROMPTS)} prompts x {IMAGES_PER_PROMPT}), "
          f"{settings.num_inference_steps} DDIM steps, CFG {settings.guidance_scale}, {settings.resolution} px, "
          f"{args.rounds - 1} timed rounds after 1 warm-up\n")  # fmt: skip
    print("| side | s per 16 images (median) | img/s | ours faster by (medians) | per-round ratio, median [min-max] |")
    print("| --- | --- | --- | --- | --- |")
    ours_s = seconds["ours"][1:]
    for side, values in seconds.items():
        timed_values = values[1:]
        ratios = sorted(t / o for t, o in zip(timed_values, ours_s))
        median = statistics.median(timed_values)
        print(f"| {side} | {median:.3f} | {count / median:.1f} | {median / statistics.median(ours_s):.2f}x "
              f"| {statistics.median(ratios):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}] |")  # fmt: skip
    print(f"\nmax pixel difference, ours at generation_batch_size 8 vs 1 (same seeds, {count} images): {difference}")


if __name__ == "__main__":
    main()
