"""Packed LoRA training on a GPU at SD1.5's (or, with `--model sdxl`, SDXL's) real shapes: seconds per packed step
and peak memory for K subjects per UNet batch, against the stock one-subject loop, projected to subjects per GPU-hour.

The engine alone, no Ray (the GPU machine has only torch, diffusers, transformers, peft and safetensors besides the
engine's own imports). The model is bench/gpu_train_step.py's SD1.5-shaped pipeline with random weights (UNet
320/640/1280/1280, cross-attention 768, head dim 8, 2 layers per block; VAE 128/256/512/512, 4 latent channels;
CLIP text encoder 768 × 12 layers × 12 heads, 3072 MLP), saved with save_pretrained and loaded with
engine.diffusion.base_model.load_base_model. LoRA r4, 512 px, bf16 mixed precision, each subject 1 instance + 1 class per step.

`--model sdxl`: SDXL base 1.0's real shapes with random weights, never downloaded (`build_sdxl_random`: its UNet
config, 320/640/1280, transformer depths 1/2/10, cross-attention 2048, text_time conditioning; its VAE with scale
0.13025; CLIP-L 768 × 12 and OpenCLIP-bigG-shaped 1280 × 32 text encoders, with the tiny tokenizer's vocabulary), at
1024 px, packs K = 1, 2, 4, 8, generation batches of 8. The stock loop (step 5) is SD1.x's script and is skipped.

Measured, in this order (each measurement is skipped once `--budget-s` has run out, so the table always prints):
1. frozen base weights in bf16 (`load_base_model(path, "cuda", torch.bfloat16)`), K = 1, 2, 4, 8, 16 through
   `PackTrainer` directly: admit K subjects (drawn instance images, 4 shared class images made first), then
   `trainer.step()` `--warmup` + `--steps` times, each between two torch.cuda.synchronize; the median after warm-up,
   and torch.cuda.max_memory_allocated over the steps. An out-of-memory K is reported and stops the sweep.
2. packed generation, 30 DDIM steps, CFG, generation_batch_size `--gen-batch`, K subjects' images mixed in every
   batch through `render_pack` (one warm-up batch first); seconds per image, PNG writing included.
3. with `--compile`: `base.compile_unet()` and K = 8 again (the first step's seconds show the compile).
4. frozen base weights in fp32 under bf16 autocast (what "frozen weights in the training precision" replaced), K = 1, 8.
5. the stock loop: bench/stock_dreambooth.py (diffusers' train_dreambooth_lora.py step: peft-injected LoRA on a
   bf16 UNet, both images VAE-encoded and both prompts encoded every step, autocast bf16, AdamW), on its own copy.
Projection: subjects per GPU-hour = 3600 / (admission s per subject + 800 × s per step / K + 16 × s per image).

On the GPU machine, from the repo root (about 3–5 minutes on an H200):
    python bench/gpu_pack_train.py [--compile]           # JSON also to $OUT/gpu_pack_train.json when OUT is set
    python bench/gpu_pack_train.py --model sdxl          # $OUT/gpu_pack_train_sdxl.json
Check on CPU with the tiny models (their timings mean nothing; < 2 minutes each):
    .venv/bin/python bench/gpu_pack_train.py --smoke [--model sdxl]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# gpu_train_step checks the packages it needs at import and names any that are missing before device time is spent.
from bench.gpu_train_step import build_sd15_random  # noqa: E402
from bench.pack_training_cpu import CLASS_PROMPT, PROMPT, draw_ball  # noqa: E402
from bench.stock_dreambooth import StockDreamBooth  # noqa: E402
from engine.diffusion.base_model import BaseModel, load_base_model  # noqa: E402
from engine.diffusion.class_images import ClassImageCache  # noqa: E402
from engine.diffusion.generation import RenderJob, render_pack  # noqa: E402
from engine.diffusion.subject import Subject  # noqa: E402
from engine.diffusion.train import PackTrainer  # noqa: E402
from engine.diffusion.weights import attach_lora_pack  # noqa: E402
from engine.library_logging import quiet_libraries  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402
from engine.tiny.common import build_clip_tokenizer
from engine.tiny.sd import build_tiny_sd, build_tiny_sdxl  # noqa: E402

TRAIN_STEPS, IMAGES_PER_SUBJECT = 800, 16  # the projection's work per subject (diffusers' LoRA defaults, SPEC's 4×4)
STARTED = time.perf_counter()


class Clock:
    """Wall seconds of GPU work: synchronises before reading the clock, so queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def out_of_time(args) -> bool:
    return time.perf_counter() - STARTED > args.budget_s


def train_settings(args, preset: str) -> Settings:
    """Nobody finishes or checkpoints inside the timed steps; 2 sampler steps make the class images (setup)."""
    return load_settings(preset, overrides={
        "mode": "lora", "lora_rank": 4, "resolution": args.resolution, "mixed_precision": "bf16",
        "train_batch_size": 1, "max_train_steps": 10**6, "checkpointing_steps": 10**9,
        "num_class_images": 4, "num_inference_steps": 2, "sample_batch_size": 4,
    })  # fmt: skip


def make_subjects(work: Path, count: int, resolution: int) -> list[Subject]:
    size = (resolution * 3 // 2, resolution * 5 // 4)  # larger than the crop, as photos are
    return [
        Subject(f"s{i}", draw_ball(work / "images" / f"s{i}", i, size=size), PROMPT, CLASS_PROMPT, seed=100 + i)
        for i in range(count)
    ]


# -- training ------------------------------------------------------------------------------------------------------


def _pack_steps(trainer: PackTrainer, subjects, settings, class_uris, work: Path, args, clock: Clock) -> dict:
    began = clock.now()
    for s in subjects:
        trainer.admit(s, settings, str(work / s.subject_id), class_uris)
    admit_s = (clock.now() - began) / len(subjects)
    if clock.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # steady state from here: admission's VAE encodes are setup
    seconds = []
    for _ in range(args.warmup + args.steps):
        began = clock.now()
        trainer.step()
        seconds.append(clock.now() - began)
    return {"s_per_step": statistics.median(seconds[args.warmup :]), "first_step_s": seconds[0],
            "admit_s_per_subject": admit_s, "peak_gb": peak_gb(clock.device)}  # fmt: skip


def measure_pack(base: BaseModel, k: int, subjects, settings, class_uris, work: Path, args) -> dict:
    """K subjects in one PackTrainer: s per packed step and steady-state peak memory; {"oom": True} if it does not fit."""
    if out_of_time(args):
        return {"skipped": "time budget"}
    free_memory(base.device)
    trainer = PackTrainer(base, settings, k)
    try:
        result = _pack_steps(trainer, subjects[:k], settings, class_uris, work / f"k{k}", args, Clock(base.device))
    except torch.cuda.OutOfMemoryError:
        result = {"oom": True}
    finally:
        trainer.close()
    free_memory(base.device)  # after the except block: its traceback no longer holds the batch's tensors
    return result


def sweep(base: BaseModel, packs, subjects, settings, class_uris, work: Path, args) -> dict:
    results = {}
    for k in packs:
        results[k] = measure_pack(base, k, subjects, settings, class_uris, work, args)
        print(f"  K={k}: {results[k]}", file=sys.stderr, flush=True)
        if results[k].get("oom") or results[k].get("skipped"):
            break  # a larger pack needs more memory still
    return results


def measure_stock(model_dir: Path, settings: Settings, subject: Subject, class_uris, device, args) -> dict:
    """The stock per-subject step, on its own copy of the model (the engine's base is freed before)."""
    if args.model == "sdxl":
        return {"skipped": "the stock loop is SD1.x's"}
    if out_of_time(args):
        return {"skipped": "time budget"}
    free_memory(device)
    loop = StockDreamBooth(model_dir, settings, list(subject.instance_images), class_uris, (PROMPT, CLASS_PROMPT),
                           device, seed=7)  # fmt: skip
    clock, seconds = Clock(device), []
    for step in range(args.warmup + args.steps):
        began = clock.now()
        loop.step()
        seconds.append(clock.now() - began)
        if step == 0 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # steady state, as for the packs
    result = {"s_per_step": statistics.median(seconds[args.warmup :]), "peak_gb": peak_gb(device),
              "optimizer": type(loop.optimizer).__name__}  # fmt: skip
    del loop
    free_memory(device)
    return result


# -- generation ----------------------------------------------------------------------------------------------------


def render_jobs(k: int, images: int, settings: Settings, instance: tuple[str, ...], folder: Path) -> list[RenderJob]:
    """K subjects sharing `images` images (each its own prompt and seed); render_pack mixes them in every batch."""
    per = max(1, images // k)
    subjects = [Subject(f"g{i}", instance, PROMPT, prompts=(f"a photo of sks ball, number {i}",),
                        num_images_per_prompt=per, seed=i) for i in range(k)]  # fmt: skip
    return [RenderJob(s, settings, str(folder / s.subject_id), slot) for slot, s in enumerate(subjects)]


def measure_generation(base: BaseModel, k: int, settings: Settings, instance, work: Path, args) -> dict:
    """Seconds per image of packed rendering, K subjects' images per batch (their slots freshly initialised: the
    routed work per image does not depend on what the adapters have learned)."""
    if out_of_time(args):
        return {"skipped": "time budget"}
    free_memory(base.device)
    pack = attach_lora_pack(base, settings, capacity=k)
    for slot in range(k):
        pack.init_slot(slot, settings.effective_lora_alpha, torch.Generator().manual_seed(slot))
    clock = Clock(base.device)
    try:
        render_pack(base, render_jobs(k, settings.generation_batch_size, settings, instance, work / f"warm{k}"))
        jobs = render_jobs(k, args.gen_images, settings, instance, work / f"gen{k}")
        images = sum(job.subject.num_images_per_prompt for job in jobs)
        began = clock.now()
        render_pack(base, jobs)
        seconds = clock.now() - began
    finally:
        base.reset()
    return {"s_per_image": seconds / images, "images": images, "batch": settings.generation_batch_size,
            "peak_gb": peak_gb(base.device)}  # fmt: skip


# -- the run -------------------------------------------------------------------------------------------------------


def build_sdxl_random(path: Path, device: torch.device) -> None:
    """Write an SDXL-base-1.0-shaped pipeline with random weights at `path` (initialised on `device`, saved in bf16:
    half the disk and load time of fp32, and what the frozen weights train in)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer()

    def clip(hidden: int, layers: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        )
        text_encoder = CLIPTextModel(clip(768, 12, 12, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(clip(1280, 32, 20, "gelu"))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(), scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip
    pipe.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)


def build_model(args, work: Path, device: torch.device) -> Path:
    model_dir = work / "model"
    if args.smoke:
        (build_tiny_sdxl if args.model == "sdxl" else build_tiny_sd)(model_dir)
    else:
        (build_sdxl_random if args.model == "sdxl" else build_sd15_random)(model_dir, device)
    return model_dir


def run(args, work: Path, device: torch.device) -> dict:
    model_dir = build_model(args, work, device)
    settings = train_settings(args, "tiny" if args.smoke else str(model_dir))
    gen_settings = settings.with_overrides(
        {"num_inference_steps": args.gen_steps, "generation_batch_size": args.gen_batch}
    )
    subjects = make_subjects(work, max(args.packs), args.resolution)
    results: dict = {"setup_s": None}

    base = load_base_model(model_dir, device, torch.bfloat16)
    class_uris = ClassImageCache(str(work / "class_images")).ensure(base, CLASS_PROMPT, settings).uris
    results["setup_s"] = time.perf_counter() - STARTED
    print(f"setup done in {results['setup_s']:.0f} s", file=sys.stderr, flush=True)
    results["bf16"] = sweep(base, args.packs, subjects, settings, class_uris, work / "bf16", args)
    results["generation"] = {
        k: measure_generation(base, k, gen_settings, subjects[0].instance_images, work, args) for k in args.gen_packs
    }
    if args.compile:
        base.compile_unet()
        results["bf16_compiled"] = sweep(base, [8], subjects, settings, class_uris, work / "compiled", args)
    del base
    free_memory(device)

    base = load_base_model(model_dir, device, torch.float32)  # bf16 only through autocast, per op, every step
    results["fp32_autocast"] = sweep(base, args.fp32_packs, subjects, settings, class_uris, work / "fp32", args)
    del base
    free_memory(device)
    results["stock"] = measure_stock(model_dir, settings, subjects[0], class_uris, device, args)
    return results


# -- report --------------------------------------------------------------------------------------------------------


def gen_seconds(results: dict, k: int) -> float | None:
    """Seconds per image from the largest measured generation pack no bigger than K (K=1's for the stock loop)."""
    measured = [g for gk, g in sorted(results["generation"].items()) if gk <= k and "s_per_image" in g]
    return measured[-1]["s_per_image"] if measured else None


def per_hour(step_s_per_subject: float, admit_s: float, image_s: float | None) -> float | None:
    if image_s is None:
        return None
    return 3600 / (admit_s + TRAIN_STEPS * step_s_per_subject + IMAGES_PER_SUBJECT * image_s)


def training_rows(results: dict) -> list[dict]:
    stock = results["stock"]
    rows = []
    if "s_per_step" in stock:
        rows.append({"variant": "stock loop (peft LoRA, encodes every step)", "k": 1, **stock, "admit_s_per_subject": 0.0})
    for key, label in [("bf16", "pack, frozen bf16"), ("bf16_compiled", "pack, frozen bf16, compiled"),
                       ("fp32_autocast", "pack, frozen fp32 + autocast")]:  # fmt: skip
        for k, r in results.get(key, {}).items():
            rows.append({"variant": label, "k": k, **r})
    for row in rows:
        if "s_per_step" in row:
            row["s_per_subject_step"] = row["s_per_step"] / row["k"]
            row["subjects_per_hour"] = per_hour(row["s_per_subject_step"], row["admit_s_per_subject"],
                                                gen_seconds(results, row["k"] if row["variant"][0] == "p" else 1))  # fmt: skip
    return rows


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_tables(info: dict, results: dict, rows: list[dict]) -> None:
    for key, value in info.items():
        print(f"{key}: {value}")
    stock_rate = next((r.get("subjects_per_hour") for r in rows if r["variant"].startswith("stock")), None)
    print(f"\nTraining (median s per step after warm-up; subjects per GPU-hour = {TRAIN_STEPS} steps + "
          f"{IMAGES_PER_SUBJECT} images + admission)\n")  # fmt: skip
    print("| variant | K | s/step | s per subject-step | first step s | peak GB (steps) | admission s/subject "
          "| subjects per GPU-hour | vs stock |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "s_per_step" not in r:
            print(f"| {r['variant']} | {r['k']} | {'out of memory' if r.get('oom') else r.get('skipped')} |||||||")
            continue
        rate = r.get("subjects_per_hour")
        ratio = f"{rate / stock_rate:.2f}x" if rate and stock_rate else "n/a"
        print(f"| {r['variant']} | {r['k']} | {r['s_per_step']:.4f} | {r['s_per_subject_step']:.4f} "
              f"| {fmt(r.get('first_step_s'), '.2f')} | {fmt(r['peak_gb'], '.2f')} | {r['admit_s_per_subject']:.3f} "
              f"| {fmt(rate, ',.1f')} | {ratio} |")  # fmt: skip
    print("\nPacked generation (render_pack, K subjects' images mixed in every batch)\n")
    print("| K | batch | images | s/image | images/s | peak GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, g in results["generation"].items():
        if "s_per_image" not in g:
            print(f"| {k} | {g.get('skipped')} |||||")
            continue
        print(f"| {k} | {g['batch']} | {g['images']} | {g['s_per_image']:.4f} | {1 / g['s_per_image']:.2f} "
              f"| {fmt(g['peak_gb'], '.2f')} |")  # fmt: skip


def describe(args, device: torch.device) -> dict:
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    return {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]), "device": name,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "model": f"{'tiny' if args.smoke else 'real-shaped, random weights'}: {args.model}",
        "resolution": args.resolution,
        "lora_rank": 4, "steps": args.steps, "warmup": args.warmup, "gen_steps": args.gen_steps,
    }  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15", help="which real shapes")
    parser.add_argument("--packs", type=int, nargs="+", default=None, help="default 1 2 4 8 16 (SDXL: 1 2 4 8)")
    parser.add_argument("--fp32-packs", type=int, nargs="+", default=None, help="default 1 8 (SDXL: 1 4)")
    parser.add_argument("--gen-packs", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per pack, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (SDXL: 1024)")
    parser.add_argument("--gen-steps", type=int, default=30, help="DDIM steps per image")
    parser.add_argument("--gen-batch", type=int, default=None, help="generation_batch_size (CFG doubles it); "
                        "default 16 (SDXL: 8, as its VAE decodes 4x the pixels per image)")  # fmt: skip
    parser.add_argument("--gen-images", type=int, default=32, help="timed images per generation pack")
    parser.add_argument("--compile", action="store_true", help="also K=8 with base.compile_unet()")
    parser.add_argument("--budget-s", type=float, default=420, help="skip what is left after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, tiny sizes: checks that it runs")
    args = parser.parse_args()
    sdxl = args.model == "sdxl"
    args.packs = args.packs or ([1, 2, 4, 8] if sdxl else [1, 2, 4, 8, 16])
    args.fp32_packs = args.fp32_packs or ([1, 4] if sdxl else [1, 8])
    args.resolution = args.resolution or (1024 if sdxl else 512)
    args.gen_batch = args.gen_batch or (8 if sdxl else 16)
    if args.smoke:
        args.resolution, args.steps, args.warmup = 32, 2, 1
        args.gen_steps, args.gen_batch, args.gen_images = 3, 8, 8
        args.packs, args.gen_packs = [1, 2, 4, 8, 16], [1, 8]
        torch.set_num_threads(1)  # CPU machines here are shared: more threads than free cores slow everything
    return args


def main() -> None:
    args = parse_args()
    quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: running on CPU; these are not GPU figures", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-pack-") as work:
        results = run(args, Path(work), device)
    info = describe(args, device)
    rows = training_rows(results)
    print_tables(info, results, rows)
    if os.environ.get("OUT"):
        name = "gpu_pack_train_sdxl.json" if args.model == "sdxl" else "gpu_pack_train.json"
        path = Path(os.environ["OUT"]) / name
        path.write_text(json.dumps({**info, "results": results, "rows": rows}, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
