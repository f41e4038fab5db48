"""Images per second of SD1.x text-to-image at real shapes on one GPU: stock diffusers against dreamfleet's generation
path, with the serving options as flags. The engine alone, no Ray.

Model: SD1.5-shaped, random weights (UNet 320/640/1280/1280, cross-attention 768, head dim 8, 2 layers per block,
sample size 64; VAE 128/256/512/512; CLIP text encoder 768 wide, 12 layers; the character-level tiny tokenizer;
DDIM with SD1.5's config), built by bench/gpu_train_step.py's `build_sd15_random`, saved with save_pretrained and
loaded with engine.diffusion.base_model.load_base_model. 512 px, 30 DDIM steps, CFG 7.5, --dtype (fp16) weights.

Measured, each at every batch size listed, after one 2-step warm-up call, median of --repeats calls:
1. stock: `StableDiffusionPipeline.from_pretrained(dir, dtype=fp16)` (its default SDPA attention), one call of
   `batch` prompts: the NOTES baseline on an H200 is 1.0 / 3.08 / 4.88 / 5.17 img/s at batch 1 / 4 / 8 / 16.
2. engine as shipped: `engine.diffusion.generation.generate` on the resident base model as load_base_model leaves it (fp32,
   the precision the fleet generates in today), at --shipped-batch: `batch` prompts at batch_size `batch`, one seed
   and one starting-noise tensor per image, as the fleet renders.
   engine under autocast: the same, fp32 weights, inside torch.autocast(--dtype), at --autocast-batch: the
   half-precision route that leaves the shared weights fp32 for training.
   engine, eager: the same on the resident model cast to --dtype, at --engine-batches.
3. engine, optimized: the same after the options given as flags are applied to the resident model (--channels-last,
   --fuse-qkv, --compile MODE with optional --inductor-tuning); then `render_subject` (PNG encode and write included)
   at the best of those batches, and the largest pixel difference between optimized and eager images (same seeds).
The engine has no setting for any of these options, nor for a half-precision base model: `load_base_model` loads
fp32, and `generate` hands the pipeline fp32 latents, which a fp16 UNet rejects. `half_precision` below casts the
resident modules and adds two input casts that stand in for the missing engine change.
No subject weights are attached: these are base-model figures (see bench/RESULTS-generation-vlm.md on LoRA).

Targets (NOTES, one H200): stock best 5.17 img/s (batch 16); channels_last + fused QKV + torch.compile measured at
34.1 ms per UNet step at CFG batch 16, about 7.1 img/s; goal >= 12 img/s; physical limit ~18.8 img/s (677 GFLOP per
UNet sample x 2 for CFG x 30 steps at ~790 TFLOP/s bf16/fp16).

Prediction, written before any device run. Stock as in NOTES (~5.2 img/s best). The engine in fp32 as shipped:
2-3x slower than stock fp16 at the same batch (TF32 convolutions, full-fp32 attention and linear layers). Under
autocast, and with fp16 weights: within 10% of stock at the same batch (the same pipeline; autocast re-casts the
weights each UNet call, ~1-2 ms of ~50), ~5.3 img/s at 32. Optimized: ~7-7.5 img/s (1.4x stock best), short of
the 12 img/s goal, which needs ~60% of peak FLOPs. render_subject 10-25% below generate at the same batch: PNG
encoding runs serially on one CPU core (5-45 ms per 512 px image measured here, by content).

Needs torch, diffusers, transformers, peft, safetensors and the engine's own imports (pydantic, pyyaml, fsspec,
pillow, numpy); no Ray. On the GPU machine, from the repo root (about 6 minutes, 2 of them compiling):
    python bench/gpu_generation.py --channels-last --fuse-qkv --compile default --out gen.json
Check at tiny shapes on CPU (tiny model, 32 px, 2 steps, no compile):
    .venv/bin/python bench/gpu_generation.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.gpu_train_step import build_sd15_random  # noqa: E402
from engine.diffusion.base_model import BaseModel, load_base_model  # noqa: E402
from engine.diffusion.generation import generate, image_seed, render_subject  # noqa: E402
from engine.diffusion.subject import Subject  # noqa: E402
from engine.library_logging import quiet_libraries  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402
from engine.tiny.sd import build_tiny_sd  # noqa: E402

PROMPT = "a photo of sks ball on a wooden table, studio light"
SEED = 11
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TARGETS = {"stock_h200_best": 5.17, "compiled_h200_estimate": 7.1, "goal": 12.0, "physical_limit": 18.8}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(call: Callable[[int], object], batch: int, repeats: int, device: torch.device) -> dict:
    """Median seconds (and peak memory) of `repeats` calls of `call(batch)`, each producing `batch` images."""
    seconds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        call(batch)
        sync(device)
        seconds.append(time.perf_counter() - began)
    median = statistics.median(seconds)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return {"batch": batch, "s_per_call": median, "img_per_s": batch / median, "peak_gb": peak}


def stock_results(model_dir: Path, settings: Settings, dtype: torch.dtype, device, args) -> list[dict]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)

    def call(batch: int, steps: int = settings.num_inference_steps):
        return pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=settings.guidance_scale,
                    height=settings.resolution, width=settings.resolution,
                    generator=torch.Generator(device).manual_seed(SEED)).images  # fmt: skip

    results = []
    for batch in args.stock_batches:
        call(batch, steps=2)  # warm-up: cuDNN algorithm choice, allocator growth
        results.append(measure(call, batch, args.repeats, device))
    return results


def half_precision(base: BaseModel, dtype: torch.dtype) -> None:
    """Cast the resident model to `dtype`. engine.diffusion.generation.generate draws fp32 latents and moves them with
    `.to(device)` only, so the UNet and the VAE decoder get their input cast here; in the engine this is one change,
    `.to(base.device, base.unet.dtype)` on the latents, plus a dtype option for load_base_model."""
    for module in (base.unet, base.vae, base.text_encoder):
        module.to(dtype)
    base.unet.register_forward_pre_hook(
        lambda _, args, kwargs: ((args[0].to(dtype), *args[1:]), kwargs), with_kwargs=True
    )
    decode = base.vae.decode
    base.vae.decode = lambda latents, *rest, **kwargs: decode(latents.to(dtype), *rest, **kwargs)


def autocast_results(base: BaseModel, settings: Settings, batch: int, dtype: torch.dtype, device, args) -> list[dict]:
    """The engine's generate on the fp32 resident model inside torch.autocast(dtype)."""
    with torch.autocast(device.type, dtype=dtype):
        return engine_results(base, settings, [batch], device, args, {})


def apply_options(base: BaseModel, args) -> list[str]:
    """The serving options, applied to the resident model in place; returns their names."""
    applied = []
    if args.channels_last:
        base.unet.to(memory_format=torch.channels_last)
        base.vae.to(memory_format=torch.channels_last)
        applied.append("channels_last (UNet, VAE)")
    if args.fuse_qkv:
        base.unet.fuse_qkv_projections()  # copies q/k/v weights into one matrix: an attached LoRA would be ignored
        applied.append("fused QKV (UNet)")
    if args.compile != "none":
        if args.inductor_tuning:
            # diffusers' documented inductor settings for UNets (docs: "Accelerate inference of text-to-image").
            import torch._inductor.config as inductor

            inductor.conv_1x1_as_mm = True
            inductor.coordinate_descent_tuning = True
            inductor.epilogue_fusion = False
            inductor.coordinate_descent_check_all_directions = True
        torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per batch size, as measured
        base.unet.compile(mode=args.compile)
        tuning = ", inductor tuning" if args.inductor_tuning else ""
        applied.append(f"torch.compile UNet, mode {args.compile}{tuning}")
    return applied


def engine_call(base: BaseModel, settings: Settings, keep: dict[int, list] | None = None):
    """A `call(batch)` running the engine's `generate` on `batch` prompts with their per-image seeds."""

    def call(batch: int, steps: int = settings.num_inference_steps):
        seeds = [image_seed(SEED, 0, i) for i in range(batch)]
        run_settings = settings.with_overrides({"num_inference_steps": steps})
        images = generate(base, [PROMPT] * batch, seeds, run_settings, batch_size=batch)
        if keep is not None and steps == settings.num_inference_steps:
            keep[batch] = images
        return images

    return call


def engine_results(base: BaseModel, settings: Settings, batches: list[int], device, args, keep: dict) -> list[dict]:
    call = engine_call(base, settings, keep)
    results = []
    for batch in batches:
        began = time.perf_counter()
        call(batch, steps=2)  # warm-up; with --compile this is where the graph for this batch size is built
        warmup_s = time.perf_counter() - began
        results.append({**measure(call, batch, args.repeats, device), "warmup_s": warmup_s})
    return results


def render_result(base: BaseModel, settings: Settings, batch: int, device, args) -> dict:
    """`render_subject` (generate, then PNG encode and write per image) at one batch of `batch` images."""
    subject = Subject("bench", ("unused.png",), PROMPT, prompts=(PROMPT,), seed=SEED)
    settings = settings.with_overrides({"generation_batch_size": batch, "num_images_per_prompt": batch})
    with tempfile.TemporaryDirectory(prefix="bench-render-") as work:
        folders = (f"{work}/{i}" for i in range(args.repeats))  # a fresh folder per call: present images are skipped

        def call(_: int) -> list[dict]:
            return render_subject(base, subject, settings, next(folders))

        return measure(call, batch, args.repeats, device)


def max_pixel_difference(a: list, b: list) -> int:
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args, model_dir: Path, device: torch.device) -> dict:
    dtype = DTYPES[args.dtype]
    settings = load_settings("sd15-random", overrides={
        "resolution": args.resolution, "num_inference_steps": args.steps, "guidance_scale": 7.5, "scheduler": "ddim",
    })  # fmt: skip
    stock = stock_results(model_dir, settings, dtype, device, args)
    free_memory(device)  # the stock pipeline's copy of the weights is gone with stock_results' frame
    base = load_base_model(model_dir, device)
    shipped = engine_results(base, settings, [args.shipped_batch], device, args, {}) if args.shipped_batch else []
    autocast = autocast_results(base, settings, args.autocast_batch, dtype, device, args) if args.autocast_batch else []
    if dtype != torch.float32:
        half_precision(base, dtype)
    eager_images, optimized_images = {}, {}
    eager = engine_results(base, settings, args.engine_batches, device, args, eager_images)
    options = apply_options(base, args)
    optimized = engine_results(base, settings, args.optimized_batches, device, args, optimized_images)
    best = max(optimized, key=lambda r: r["img_per_s"])
    common = sorted(set(eager_images) & set(optimized_images))
    return {
        "stock": stock, "engine_shipped_fp32": shipped, "engine_autocast": autocast, "engine_eager": eager,
        "engine_optimized": optimized, "options": options,
        "render_subject": render_result(base, settings, best["batch"], device, args),
        "attention_processor": sorted({type(p).__name__ for p in base.unet.attn_processors.values()}),
        "max_pixel_difference_optimized_vs_eager": (
            {"batch": common[0], "value": max_pixel_difference(eager_images[common[0]], optimized_images[common[0]])}
            if common else None
        ),
    }  # fmt: skip


def describe(args, device: torch.device) -> dict:
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {len(os.sched_getaffinity(0))} cores"
    return {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]), "device": name,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "dtype": args.dtype,
        "model": "tiny" if args.smoke else "SD1.5-shaped, random weights", "resolution": args.resolution,
        "steps": args.steps, "guidance_scale": 7.5, "scheduler": "ddim", "repeats": args.repeats,
    }  # fmt: skip


def print_report(info: dict, results: dict) -> None:
    for key, value in info.items():
        print(f"{key}: {value}")
    print(f"options: {', '.join(results['options']) or 'none'}; UNet attention: {results['attention_processor']}")
    stock_best = max(r["img_per_s"] for r in results["stock"])
    print("\n| side | batch | s per call | img/s | vs stock best | peak GB | warm-up s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = [("stock pipeline", r) for r in results["stock"]]
    rows += [("engine generate, as shipped (fp32)", r) for r in results["engine_shipped_fp32"]]
    rows += [(f"engine generate, fp32 weights, autocast {info['dtype']}", r) for r in results["engine_autocast"]]
    rows += [(f"engine generate, eager, {info['dtype']} weights", r) for r in results["engine_eager"]]
    rows += [("engine generate, optimized", r) for r in results["engine_optimized"]]
    rows.append(("engine render_subject (PNGs), optimized", results["render_subject"]))
    for side, r in rows:
        peak = "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        warmup = f"{r['warmup_s']:.1f}" if "warmup_s" in r else ""
        print(f"| {side} | {r['batch']} | {r['s_per_call']:.3f} | {r['img_per_s']:.2f} "
              f"| {r['img_per_s'] / stock_best:.2f}x | {peak} | {warmup} |")  # fmt: skip
    check = results["max_pixel_difference_optimized_vs_eager"]
    if check:
        print(f"\nmax pixel difference, optimized vs eager engine images (batch {check['batch']}, same seeds): "
              f"{check['value']}")  # fmt: skip
    print(f"targets on one H200 (NOTES): stock best {TARGETS['stock_h200_best']} img/s, goal >= {TARGETS['goal']}, "
          f"physical limit ~{TARGETS['physical_limit']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stock-batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--shipped-batch", type=int, default=8, help="engine batch in fp32, as shipped (0: skip)")
    parser.add_argument("--autocast-batch", type=int, default=16, help="engine batch under autocast (0: skip)")
    parser.add_argument("--engine-batches", type=int, nargs="+", default=[8, 16, 32], help="eager engine batches")
    parser.add_argument("--optimized-batches", type=int, nargs="+", default=[16, 32],
                        help="engine batches after the options (each one compiles its own graph)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels_last memory format")
    parser.add_argument("--fuse-qkv", action="store_true", help="unet.fuse_qkv_projections()")
    parser.add_argument("--compile", default="none",
                        choices=["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode for the UNet")  # fmt: skip
    parser.add_argument("--inductor-tuning", action="store_true", help="with --compile: diffusers' inductor flags")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 32 px, 2 steps, CPU, no compile")
    args = parser.parse_args()
    quiet_libraries()
    if args.smoke:
        args.resolution, args.steps, args.repeats, args.compile = 32, 2, 2, "none"
        args.stock_batches, args.engine_batches, args.optimized_batches = [1, 2], [2, 4], [4]
        args.shipped_batch = args.autocast_batch = 2
        args.channels_last = args.fuse_qkv = True  # exercised at tiny shapes
        torch.set_num_threads(1)  # CPU machines here are shared: more threads than free cores slow everything
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: running on CPU; these are not GPU figures", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="bench-gpu-gen-") as work:
        model_dir = Path(work) / "model"
        if args.smoke:
            build_tiny_sd(model_dir)
        else:
            build_sd15_random(model_dir, device)
        results = run(args, model_dir, device)
    info = describe(args, device)
    print_report(info, results)
    if args.out:
        args.out.write_text(json.dumps({**info, "targets": TARGETS, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
