"""Seconds per DreamBooth step and peak GPU memory at SD1.x's real shapes: the engine against the stock loop.

The engine alone, no Ray. An SD1.5-shaped pipeline with random weights (UNet 320/640/1280/1280, cross-attention
768, head dim 8, 2 layers per block; VAE 128/256/512/512, 4 latent channels; CLIP text encoder 768 wide, 12
layers, 12 heads; DDIM scheduler as SD1.5's) is built here, saved with save_pretrained (safetensors) to a temporary
directory and loaded with engine.diffusion.base_model.load_base_model. Its text encoder's vocabulary is the tiny character-level
tokenizer's (514 tokens, not CLIP's 49,408): 37 M fewer embedding weights, nothing else smaller than SD1.5.

For each mode (LoRA r4, full UNet), at `--resolution` with bf16 mixed precision, batch 1 instance + 1 class:
- engine: `train_subject`; s/step is the median of its StepRecord.seconds after `--warmup` steps (and, as a check
  on asynchronous GPU work, the median wall time between on_step calls). The loop is stopped from on_step after the
  last timed step, so the final checkpoint and export, which are not part of a step, spend no device time. The 4
  class images are made first with 2 sampler steps (setup, untimed).
- stock: bench/stock_dreambooth.py, the per-step loop of diffusers' train_dreambooth.py / train_dreambooth_lora.py
  (images read and VAE-encoded, prompts encoded every step; fp32 master weights under bf16 autocast in full mode,
  frozen weights in bf16 in LoRA mode, as those scripts do), on its own copy of the model after the engine's base
  model is freed, so each peak holds one model only.
Peak memory is torch.cuda.max_memory_allocated, twice per run: over the steps after the first (steady state, the
optimizer state allocated), and over the whole run (the engine's setup VAE-encodes all examples at full size).
Both sides get the same Settings, so both use bitsandbytes' 8-bit AdamW if it is installed, torch's AdamW if not.

Needs torch, diffusers, transformers, peft, safetensors, and what the engine imports besides (pydantic, pyyaml,
fsspec, pillow, numpy). On a GPU machine, from the repo root:
    python bench/gpu_train_step.py --modes lora full --steps 30 --out results.json
Check at tiny shapes on CPU (the tiny model, 32 px):
    .venv/bin/python bench/gpu_train_step.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Name what is missing before spending device time: the engine also needs pydantic, pyyaml and fsspec.
REQUIRED = ("torch", "diffusers", "transformers", "peft", "safetensors", "pydantic", "yaml", "fsspec", "PIL", "numpy")
if missing := [name for name in REQUIRED if importlib.util.find_spec(name) is None]:
    sys.exit(f"missing Python packages: {', '.join(missing)}")

import torch  # noqa: E402

from bench.ball_subject import CLASS_PROMPT, PROMPT, draw_subject  # noqa: E402
from bench.stock_dreambooth import StockDreamBooth  # noqa: E402
from engine.diffusion.base_model import BaseModel, load_base_model  # noqa: E402
from engine.diffusion.class_images import ClassImageCache  # noqa: E402
from engine.diffusion.subject import Subject  # noqa: E402
from engine.diffusion.train import StepRecord, train_subject  # noqa: E402
from engine.library_logging import quiet_libraries  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402
from engine.tiny.common import build_clip_tokenizer
from engine.tiny.sd import build_tiny_sd  # noqa: E402

SEED = 7
GOALS = {"lora": {"s_per_step": 0.05, "peak_gb": 6.0}, "full": {"s_per_step": 0.06, "peak_gb": 12.0}}


def build_sd15_random(path: Path, device: torch.device) -> None:
    """Write an SD1.5-shaped pipeline with random weights at `path` (weights initialised on `device`, for speed)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, num_train_timesteps=1000,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path, safe_serialization=True)


def bench_settings(mode: str, args, preset: str) -> Settings:
    """One more step than timed: the loop is stopped after the last timed one, before the final checkpoint."""
    return load_settings(
        preset,
        overrides={
            "mode": mode, "lora_rank": 4, "resolution": args.resolution, "mixed_precision": "bf16",
            "train_batch_size": 1, "max_train_steps": args.steps + 1, "checkpointing_steps": 10**9,
            "num_class_images": 4, "num_inference_steps": 2, "sample_batch_size": 4,
        },
    )  # fmt: skip


class _StopTiming(Exception):
    pass


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def take_peak(device: torch.device) -> float | None:
    """Peak allocated GPU memory (GB) since the last reset, then reset; None off the GPU."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    return peak


def peaks(setup: float | None, steps: float | None) -> dict:
    """Peak memory of the steps after the first (steady state), and of the whole run, setup and first step included."""
    return {"step_peak_gb": steps, "peak_gb": None if steps is None else max(setup, steps)}


def engine_run(base: BaseModel, subject: Subject, settings: Settings, class_uris: list[str], args) -> dict:
    seconds, stamps, setup_peak = [], [], []

    def on_step(record: StepRecord) -> None:
        seconds.append(record.seconds)
        stamps.append(time.perf_counter())
        if record.step == 1:  # up to here: encoding the examples (a batch of VAE encodes at full resolution)
            setup_peak.append(take_peak(base.device))
        if record.step == args.steps:
            raise _StopTiming

    free_memory(base.device)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as subject_dir:
        try:
            train_subject(base, subject, settings, subject_dir, class_uris, on_step=on_step)
        except _StopTiming:
            pass
    walls = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "s_per_step": statistics.median(seconds[args.warmup :]),
        "wall_s_per_step": statistics.median(walls[args.warmup :]),
        **peaks(setup_peak[0], take_peak(base.device)),
    }


def stock_run(model_dir: Path, settings: Settings, subject: Subject, class_uris: list[str], device, args) -> dict:
    free_memory(device)
    loop = StockDreamBooth(
        model_dir, settings, list(subject.instance_images), class_uris, (PROMPT, CLASS_PROMPT), device, SEED
    )
    seconds, setup_peak = [], None
    for step in range(1, args.steps + 1):
        began = time.perf_counter()
        loop.step()  # ends with loss.item(), a device sync, as the scripts' logging does
        seconds.append(time.perf_counter() - began)
        if step == 1:
            setup_peak = take_peak(device)
    result = {
        "s_per_step": statistics.median(seconds[args.warmup :]),
        **peaks(setup_peak, take_peak(device)),
        "optimizer": type(loop.optimizer).__name__,  # the engine's too: both come from make_optimizer(settings)
    }
    del loop
    free_memory(device)
    return result


def run(args, work: Path, device: torch.device) -> dict:
    model_dir = work / "model"
    if args.smoke:
        build_tiny_sd(model_dir)
    else:
        build_sd15_random(model_dir, device)
    preset = "tiny" if args.smoke else str(model_dir)
    settings = {mode: bench_settings(mode, args, preset) for mode in args.modes}
    image_size = (args.resolution * 3 // 2, args.resolution * 5 // 4)
    subject = Subject("ball", tuple(draw_subject(work / "subject", size=image_size)), PROMPT, CLASS_PROMPT, seed=SEED)
    base = load_base_model(model_dir, device)
    # The class set depends on resolution, count and sampler only, so every mode shares it.
    class_uris = ClassImageCache(str(work / "class_images")).ensure(base, CLASS_PROMPT, settings[args.modes[0]]).uris
    results = {mode: {"engine": engine_run(base, subject, settings[mode], class_uris, args)} for mode in args.modes}
    del base
    for mode in args.modes:
        stock = stock_run(model_dir, settings[mode], subject, class_uris, device, args)
        results[mode].update(stock=stock, stock_over_engine=stock["s_per_step"] / results[mode]["engine"]["s_per_step"])
    return results


def describe(args, device: torch.device) -> dict:
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {len(os.sched_getaffinity(0))} cores"
    return {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]), "device": name,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None,
        "model": "tiny" if args.smoke else "SD1.5-shaped, random weights", "resolution": args.resolution,
        "steps": args.steps, "warmup": args.warmup,
    }  # fmt: skip


def gigabytes(side: dict) -> str:
    if side["peak_gb"] is None:
        return "n/a"
    return f"{side['step_peak_gb']:.2f} / {side['peak_gb']:.2f}"


def print_table(info: dict, results: dict) -> None:
    for key, value in info.items():
        print(f"{key}: {value}")
    print(
        "\n| mode | engine s/step | engine wall s/step | engine peak GB, steps / whole run | stock s/step "
        "| stock peak GB, steps / whole run | stock / engine | optimizer | goal (s/step, GB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        engine, stock, goal = r["engine"], r["stock"], GOALS[mode]
        print(
            f"| {mode} | {engine['s_per_step']:.4f} | {engine['wall_s_per_step']:.4f} | {gigabytes(engine)} "
            f"| {stock['s_per_step']:.4f} | {gigabytes(stock)} | {r['stock_over_engine']:.2f}x "
            f"| {stock['optimizer']} | ≤ {goal['s_per_step']}, ≤ {goal['peak_gb']:g} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, 32 px, 6 steps, on CPU: checks that it runs, its timings mean nothing",
    )
    args = parser.parse_args()
    quiet_libraries()
    if args.smoke:
        args.resolution, args.steps, args.warmup = 32, 6, 2
        torch.set_num_threads(1)  # CPU machines here are shared: more threads than free cores slow everything
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: running on CPU; these are not GPU figures", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
        results = run(args, Path(work), device)
    info = describe(args, device)
    print_table(info, results)
    if args.out:
        args.out.write_text(json.dumps({**info, "goals": GOALS, "modes": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
