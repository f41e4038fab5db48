"""DreamBooth's prior-preservation ablation in miniature, on the `tiny` model: does λ = 1 limit language drift?

For each training seed the same subject is trained twice, with prior_loss_weight λ = 1 and λ = 0. Both runs keep
with_prior_preservation on, so the batch (1 instance + 1 class image) and every random draw are the same in both;
λ = 0 only drops the class half's gradient. The UNet normalises per sample (GroupNorm) and attends within a sample,
so at λ = 0 the class half cannot touch the instance gradient: the run is prior preservation switched off, with
the random stream of its λ = 1 twin. The pairs differ in λ alone, and their difference is measured per seed.

Each model then renders, through stock diffusers (`StableDiffusionPipeline.from_pretrained(tiny)` plus
`pipe.load_lora_weights(weights)`, or the trained UNet in full mode), the class prompt and the instance prompt
from the same fixed seeds:
- language drift: mean absolute pixel distance (0-255) of its class-prompt images to the base model's, seed for
  seed; lower means the class prior was kept;
- class take-over (the paper's PRES idea, in pixels): distance of its class-prompt images to the subject; higher
  means the class prompt was not turned into the subject;
- subject distance: mean distance of its instance-prompt images to the subject as seen through the VAE (encode,
  decode, averaged over the subject images), as tests/engine/test_train.py measures it; lower is closer.
The class half's loss (logged by the engine at λ = 0 as well) shows how far each model moved on the class images.

Run from the repo root (under 2 minutes on 2 cores):
    .venv/bin/python bench/prior_preservation_ablation.py [--mode lora|full] [--seeds 0 1 2] [--images 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.ball_subject import CLASS_PROMPT, PROMPT, draw_subject  # noqa: E402
from engine.class_images import ClassImageCache  # noqa: E402
from engine.instance_data import load_pixels  # noqa: E402
from engine.models import BaseModel, load_base_model, resolve_base_model  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402
from engine.subject import Subject  # noqa: E402
from engine.train import train_subject  # noqa: E402

RENDER_STEPS, GUIDANCE = 20, 7.5  # as tests/engine/test_train.py renders (the pipeline's default guidance)


def stock_pipeline(tiny_path: Path, weights: str | None = None, mode: str = "lora"):
    """The tiny model as stock diffusers loads it, with a subject's exported weights if given."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if weights and mode == "lora":
        pipe.load_lora_weights(weights)
    elif weights:
        pipe.unet = UNet2DConditionModel.from_pretrained(weights, subfolder="unet")
    return pipe


def render(pipe, prompt: str, count: int, resolution: int) -> np.ndarray:
    """`count` images for `prompt`, image i from seed i, as an [N, H, W, 3] array in 0-255."""
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    out = pipe([prompt] * count, num_inference_steps=RENDER_STEPS, guidance_scale=GUIDANCE, height=resolution,
               width=resolution, generator=generators, output_type="np")  # fmt: skip
    return out.images * 255.0


@torch.no_grad()
def subject_as_seen(base: BaseModel, images: list[str], settings: Settings) -> np.ndarray:
    """The subject through the VAE (encode, decode), averaged over its images: the closest a generation can get."""
    pixels = load_pixels(images, settings)
    seen = base.vae.decode(base.vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    return ((seen + 1) * 127.5).permute(0, 2, 3, 1).numpy().mean(0)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def measure(pipe, reference: dict[str, np.ndarray], args, resolution: int) -> dict[str, float]:
    """A model's class-prompt and instance-prompt images, compared with the base model's and with the subject."""
    class_images = render(pipe, CLASS_PROMPT, args.images, resolution)
    return {
        "drift": distance(class_images, reference["class"]),
        "leak": distance(class_images, reference["subject"]),
        "subject": distance(render(pipe, PROMPT, args.images, resolution), reference["subject"]),
    }


def class_half_loss(log: list[dict]) -> str:
    """The class half's loss over the first and the last 10 steps: logged at λ = 0 too, where it is not trained."""
    first, last = (statistics.fmean(r["prior_loss"] for r in part) for part in (log[:10], log[-10:]))
    return f"{first:.2f} → {last:.2f}"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


METRICS = ("drift", "leak", "subject")


def print_tables(untrained: dict[str, float], runs: dict[float, list[dict]], seeds: list[int]) -> None:
    print(
        "| model | class prompt: drift from base (lower: prior kept) | class prompt: distance to subject "
        "(higher: class not taken over) | instance prompt: distance to subject (lower: closer) |"
    )
    print("| --- | --- | --- | --- |")
    print(f"| base, untrained | 0 | {untrained['leak']:.2f} | {untrained['subject']:.2f} |")
    for weight, results in runs.items():
        print(f"| λ = {weight:g} | " + " | ".join(mean_std([r[m] for r in results]) for m in METRICS) + " |")
    gaps = {m: [b[m] - a[m] for a, b in zip(runs[1.0], runs[0.0], strict=True)] for m in METRICS}
    wins = sum(gap > 0 for gap in gaps["drift"])
    print(
        f"| λ=0 minus λ=1, paired by seed (λ=1 drifts less in {wins}/{len(seeds)}) | "
        + " | ".join(mean_std(gaps[m]) for m in METRICS)
        + " |"
    )
    print(
        "\n| training seed | drift λ=1 / λ=0 | class to subject λ=1 / λ=0 | instance to subject λ=1 / λ=0 "
        "| class-half loss, first → last 10 steps, λ=1 / λ=0 |"
    )
    print("| --- | --- | --- | --- | --- |")
    for seed, with_prior, without in zip(seeds, runs[1.0], runs[0.0], strict=True):
        cells = " | ".join(f"{with_prior[m]:.2f} / {without[m]:.2f}" for m in METRICS)
        print(f"| {seed} | {cells} | {with_prior['class_loss']} / {without['class_loss']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--images", type=int, default=8, help="rendered images per prompt and model")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; more than one oversubscribes a shared 2-core machine",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tiny_path = resolve_base_model("tiny")
    base = load_base_model(tiny_path, "cpu")
    settings = load_settings("tiny", overrides={"mode": args.mode, "max_train_steps": args.steps,
                                                "checkpointing_steps": args.steps})  # fmt: skip
    runs: dict[float, list[dict]] = {1.0: [], 0.0: []}
    with tempfile.TemporaryDirectory(prefix="bench-ablation-") as work:
        images = draw_subject(Path(work) / "subject")
        class_uris = ClassImageCache(str(Path(work) / "class_images")).ensure(base, CLASS_PROMPT, settings).uris
        base_pipe = stock_pipeline(tiny_path)
        reference = {
            "class": render(base_pipe, CLASS_PROMPT, args.images, settings.resolution),
            "subject": subject_as_seen(base, images, settings),
        }
        untrained = measure(base_pipe, reference, args, settings.resolution)
        for seed in args.seeds:
            subject = Subject("ball", tuple(images), PROMPT, CLASS_PROMPT, seed=seed)
            for weight in runs:
                trained = settings.with_overrides({"prior_loss_weight": weight})
                result = train_subject(base, subject, trained, str(Path(work) / f"s{seed}-l{weight:g}"), class_uris)
                pipe = stock_pipeline(tiny_path, result.weights_uri, args.mode)
                measured = measure(pipe, reference, args, settings.resolution)
                runs[weight].append({**measured, "class_loss": class_half_loss(result.log)})

    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"tiny model, {args.mode}, lr {settings.effective_learning_rate:g}, {args.steps} steps, batch 1 instance + "
          f"1 class; {len(args.seeds)} training seeds x {args.images} images per prompt, {RENDER_STEPS} DDIM steps, "
          f"CFG {GUIDANCE}; distances are mean |pixel| in 0-255, mean ± std over training seeds\n")  # fmt: skip
    print_tables(untrained, runs, args.seeds)


if __name__ == "__main__":
    main()
