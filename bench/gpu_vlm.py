"""Images per second of a Qwen3-VL-30B-A3B-shaped VLM answering one image each on one GPU: transformers' generate
against dreamfleet's VLM.generate, with decoding options as flags. The engine alone, no Ray.

Model: Qwen3VLMoeForConditionalGeneration with random weights, built on the GPU in bf16 (no save or load). Text:
48 layers, hidden 2048, 32 query / 4 KV heads of 128, 128 experts with 8 active, expert width 768, vocabulary
151,936, interleaved M-RoPE [24, 20, 20], theta 5e6, untied head. Vision: 27 blocks of 1152 (16 heads, MLP 4304),
16 px patches merged 2x2 into 2048-wide tokens, deepstack from blocks 8, 16, 24 (transformers' Qwen3-VL-MoE vision
defaults, which are the released model's; its text defaults are not, hence the values above). 31.1 B parameters,
~62 GB. --text-layers builds fewer text layers (decode time scales about linearly with them; say so when quoting).
Tokenizer and processor: engine.tiny.vlm's (a 1,286-token BPE; the model's larger vocabulary is simply never
decoded: the answers are noise either way), so the special-token ids in the config are the tiny tokenizer's.

Work: batches of 448x448 document images (196 image tokens each) with the caption task's instruction, greedy, 128
new tokens (a random model almost never emits its end token, so every row decodes all of them).
1. transformers: what a user writes, processor(...) then model.generate(max_new_tokens=128, do_sample=False), with
   transformers' default experts implementation, at batch 1, 8, 32: the NOTES baseline on an H200 is 0.062 / 0.49 /
   2.04 img/s, ~125 ms per decode step at every batch size (so: launch-bound, not bandwidth-bound).
2. engine: VLM.generate (the call each analyze actor makes per batch) at --engine-batches, after the options given
   as flags are set on the same resident model: --experts (transformers' MoE kernels: eager loop, batched_mm,
   grouped_mm), --static-cache (a preallocated KV cache, which makes the decode step one fixed-shape graph), --compile
   MODE (torch.compile of the decode step through generate's compile_config; reduce-overhead adds CUDA graphs).
3. engine, other visuals (issue 14), with the same options: a batch of --video-batch videos (engine.media.video.Video
   objects of --video-frames synthetic --video-size px frames, as sampled at 2 fps from a 30 fps source; the
   video budget set to hold them all unscaled: 32 x 448 x 448 px, 16 x 196 = 3,136 visual tokens a video), caption
   task; and one batch of all the pages of a --pdf-pages page PDF (samples.media_files.scanned_pdf, A4), rendered
   with engine.media.documents.render_pages at --pdf-dpi 144 within the standard preset's pixel budget (1280 x 32 x 32
   px: 962 x 1361, 1,260 visual tokens a page), OCR task. Reported as rows/s and pages/s (frames/s for videos).
For each: seconds per call, img/s (rows/s), and the split into prefill (a 1-token call: processor, vision tower,
prompt) and ms per decode step. VLM's constructor loads from a directory; a 62 GB random model is not written to
disk, so the engine's VLM is built around the resident model (see `engine_vlm`).

Goal (issue): >= 25 img/s at 448 px and 128 tokens; the H200 baseline 2.04 img/s at batch 32 (3.37 at batch 256).
Bound: at batch >= 32 nearly all 128 experts are hit every step, so each step reads ~58 GB of expert weights:
~13.5 ms at ~4.3 TB/s; 128 steps then take ~1.7 s per batch, so 25 img/s needs batches of ~48 or more.

Prediction, written before any device run. transformers 5.24 already defaults to grouped_mm experts on CUDA
(NOTES does not say which its baseline used), so the transformers side may beat the NOTES figures; its decode stays
launch-bound (thousands of small kernels and their Python per step, ~50-125 ms), roughly flat in batch size. The
engine adds nothing by itself (VLM.generate is generate plus prompt building): equal at equal batch, more img/s only
from larger batches while the step stays launch-bound (~5-8 img/s at 128). A static cache with CUDA graphs
(--static-cache --compile reduce-overhead) should bring the step to ~15-25 ms, about 15-30 img/s at batch 64-128:
the goal is reachable only that way, and only at batches of 64 or more.
Videos and pages (prediction written before any device run): at these batch sizes decoding still dominates (128
steps at the batch's step time), and the step grows little with the longer prompts (25k visual tokens in the batch
either way, a KV cache of ~3.3k tokens a row for videos, ~1.4k for pages). Prefill grows: the vision tower over
~200k patches (8 videos) or ~100k (20 pages), ~165 / ~85 TFLOP, plus ~150 TFLOP of text prefill: ~1-2 s. So eager:
~0.4-0.6 videos/s at batch 8 (images at batch 8: 0.49 img/s in NOTES), i.e. ~13-19 sampled frames/s, and ~1.0-1.5
pages/s at batch 20, within ~20% of images/s at the same batch; with CUDA graphs, a share of the image speed-up
that shrinks as the prefill's share of the call grows.

Needs torch, transformers (5.x, with torchvision for the Qwen3-VL processor), pillow, and the engine's imports; no Ray.
On the GPU machine, from the repo root (eager kernels, then CUDA graphs; each compile takes minutes):
    python bench/gpu_vlm.py --experts grouped_mm --engine-batches 32 64 128 --out vlm-eager.json
    python bench/gpu_vlm.py --experts grouped_mm --static-cache --compile reduce-overhead --stock-batches 32 \\
        --engine-batches 64 --out vlm-graphs.json
Videos and pages with little image work around them (--video-batch 0 or --pdf-pages 0 skips either new case):
    python bench/gpu_vlm.py --experts grouped_mm --stock-batches 1 --engine-batches 8 --out vlm-media.json
The pages case also needs pypdfium2 (engine.media.documents) and PyAV (samples.media_files, engine.media.video).
Check at tiny shapes on CPU (2 text layers, 4 experts, 64 px, 8 tokens; 2 videos of 4 frames, a 2-page PDF within
128 x 128 px a page; --compile works there too, slowly):
    .venv/bin/python bench/gpu_vlm.py --smoke [--static-cache] [--compile default]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from engine.library_logging import quiet_libraries  # noqa: E402
from engine.media.documents import render_pages  # noqa: E402
from engine.media.video import Video  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402
from engine.tiny.vlm import SPECIAL_TOKENS, build_config, build_processor, build_tokenizer  # noqa: E402
from engine.vlm.chat import pixel_budget  # noqa: E402
from engine.vlm.model import VLM  # noqa: E402
from engine.vlm.tasks import make_task  # noqa: E402

TEXT_30B_A3B = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    decoder_sparse_step=1, vocab_size=151936, max_position_embeddings=262144, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
    tie_word_embeddings=False,
)  # fmt: skip
VISION_30B_A3B = dict(
    depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048, patch_size=16,
    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
    hidden_act="gelu_pytorch_tanh",
)  # fmt: skip
SMOKE_VOCAB = 4096  # larger than the tiny tokenizer's 1,286, as the real model's is
TARGETS = {"stock_h200_batch32": 2.04, "goal": 25.0}


def build_model(tokenizer, args, device: torch.device, dtype: torch.dtype):
    """The random model, initialised directly on `device` in `dtype`."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    if args.smoke:
        config = build_config(tokenizer, moe=True)
        config.text_config.vocab_size = SMOKE_VOCAB
    else:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        text = {**TEXT_30B_A3B, "num_hidden_layers": args.text_layers, "pad_token_id": ids["<|endoftext|>"],
                "eos_token_id": ids["<|im_end|>"]}  # fmt: skip
        config = Qwen3VLMoeConfig(
            text_config=text, vision_config=VISION_30B_A3B, image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
        )  # fmt: skip
    torch.manual_seed(0)
    with device:
        model = Qwen3VLMoeForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def document_images(count: int, size: int) -> list[Image.Image]:
    images = []
    for i in range(count):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        for row in range(size // 24):
            line = f"INVOICE {1000 + i} line {row}: {(i * 37 + row * 11) % 1000}.00"
            draw.text((8, 4 + 24 * row), line, fill="black")
        images.append(image)
    return images


SOURCE_FPS, SAMPLED_FPS = 30.0, 2.0  # the synthetic videos' frames are as if sampled at 2 fps from 30 fps


def synthetic_videos(count: int, frames: int, size: int) -> list[Video]:
    """`count` videos of `frames` square frames, each frame a document image whose lines scroll a little."""
    pages = document_images(frames + count, size)
    step = round(SOURCE_FPS / SAMPLED_FPS)
    return [
        Video(np.stack([np.asarray(pages[v + f]) for f in range(frames)]), SOURCE_FPS,
              [f * step for f in range(frames)])
        for v in range(count)
    ]


def pdf_pages(pages: int, dpi: float, render_pixels: int) -> list[Image.Image]:
    """Every page of a scanned A4 PDF, rendered as a pass renders it (engine.media.documents.render_pages)."""
    from samples.media_files import scanned_pdf

    data = scanned_pdf(pages)
    rendered = render_pages(data, name="scanned.pdf", dpi=dpi, max_pages=pages, max_pixels=64_000_000,
                            render_pixels=render_pixels)  # fmt: skip
    return [page.image for page in rendered]


def engine_vlm(model, processor_dir: Path, settings: Settings) -> VLM:
    """The engine's VLM, constructed by its own __init__, with the resident model in place of a load from disk.
    (An engine constructor taking a loaded model and processor would make this patch unnecessary.)"""
    save_file({}, str(processor_dir / "placeholder.safetensors"))  # resolve_vlm accepts safetensors directories only
    with mock.patch("transformers.AutoModelForImageTextToText.from_pretrained", return_value=model):
        return VLM(str(processor_dir), settings, model.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(call, device: torch.device) -> tuple[float, int]:
    """Seconds of `call()` and the new tokens per row it returned."""
    sync(device)
    began = time.perf_counter()
    new_tokens = call()
    sync(device)
    return time.perf_counter() - began, new_tokens


def measure(make_call, batch: int, args, device: torch.device) -> dict:
    """`make_call(batch, max_new_tokens)` gives a call returning new tokens per row. One untimed full call (warm-up:
    compiles for this batch size where compiling), a timed 1-token call (prefill: processor, vision tower, prompt;
    a static cache made for the full length is reused), then --repeats timed full calls."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    make_call(batch, args.max_new_tokens)()
    prefill_s, _ = timed(make_call(batch, 1), device)
    runs = [timed(make_call(batch, args.max_new_tokens), device) for _ in range(args.repeats)]
    seconds = statistics.median(s for s, _ in runs)
    tokens = statistics.fmean(n for _, n in runs)
    return {
        "batch": batch, "s_per_call": seconds, "img_per_s": batch / seconds, "prefill_s": prefill_s,
        "decode_ms_per_step": 1000 * (seconds - prefill_s) / max(tokens - 1, 1), "new_tokens_per_row": tokens,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
    }  # fmt: skip


def stock_call(model, processor, images, instruction: str, settings: Settings):
    """What a user writes around transformers: chat template, processor, generate, slice off the prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def make(batch: int, max_new_tokens: int):
        def call() -> float:
            inputs = processor(text=[prompt] * batch, images=images[:batch], padding=True, return_tensors="pt",
                               **pixel_budget(settings)).to(model.device)  # fmt: skip
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            return out.shape[1] - inputs["input_ids"].shape[1]

        return call

    return make


def engine_call(vlm: VLM, images, instruction: str, settings: Settings):
    def make(batch: int, max_new_tokens: int):
        def call() -> float:
            vlm.settings = settings.with_overrides({"vlm_max_new_tokens": max_new_tokens, "vlm_batch_size": batch})
            outputs = vlm.generate(images[:batch], instruction)
            return statistics.fmean(o.num_output_tokens for o in outputs)

        return call

    return make


def apply_options(model, args) -> list[str]:
    """Decoding options, set on the resident model; VLM.generate's generate() reads them from its generation_config."""
    from transformers import CompileConfig

    applied = []
    if args.experts != "default":
        model.set_experts_implementation(args.experts)
        applied.append(f"experts {args.experts}")
    if args.static_cache:
        model.generation_config.cache_implementation = "static"
        applied.append("static KV cache")
    if args.compile != "none":
        model.generation_config.compile_config = CompileConfig(mode=args.compile)
        model.generation_config.compile_config._compile_all_devices = True  # transformers compiles on CUDA only
        applied.append(f"torch.compile of the decode step, mode {args.compile}")
    # generate() compiles on its own whenever the cache is static; without --compile, keep it eager.
    model.generation_config.disable_compile = args.compile == "none"
    return applied


def experts_implementation(model) -> str:
    return model.config.text_config._experts_implementation


def run(args, device: torch.device) -> dict:
    dtype = torch.float32 if args.smoke else torch.bfloat16
    processor = build_processor(build_tokenizer())
    model = build_model(processor.tokenizer, args, device, dtype)
    parameters = sum(p.numel() for p in model.parameters())
    settings = load_settings("qwen3-vl-shaped", overrides={
        "vlm_min_pixels": args.image_size**2, "vlm_max_pixels": args.image_size**2,
        "vlm_max_new_tokens": args.max_new_tokens, "vlm_dtype": "float32" if args.smoke else "bfloat16",
    })  # fmt: skip
    instruction = make_task("caption", settings).prompt
    images = document_images(max(args.stock_batches + args.engine_batches), args.image_size)
    stock_experts = experts_implementation(model)
    make = stock_call(model, processor, images, instruction, settings)
    stock = [measure(make, b, args, device) for b in args.stock_batches]
    options = apply_options(model, args)
    with tempfile.TemporaryDirectory(prefix="bench-vlm-processor-") as folder:
        processor.save_pretrained(folder)
        vlm = engine_vlm(model, Path(folder), settings)
    make = engine_call(vlm, images, instruction, settings)
    engine = [measure(make, b, args, device) for b in args.engine_batches]
    return {"parameters": parameters, "stock_experts": stock_experts, "options": options,
            "engine_experts": experts_implementation(model), "stock": stock, "engine": engine,
            "video": measure_videos(vlm, settings, args, device),
            "pages": measure_pages(vlm, settings, args, device)}  # fmt: skip


def measure_videos(vlm: VLM, settings: Settings, args, device: torch.device) -> list[dict]:
    """The engine on a batch of sampled videos, the video budget holding all their frames unscaled."""
    if not args.video_batch:
        return []
    frame_px = args.video_size**2
    video_settings = settings.with_overrides({"video_max_frames": args.video_frames,
                                              "video_max_pixels": args.video_frames * frame_px})  # fmt: skip
    videos = synthetic_videos(args.video_batch, args.video_frames, args.video_size)
    make = engine_call(vlm, videos, make_task("caption", video_settings).prompt, video_settings)
    row = measure(make, args.video_batch, args, device)
    return [row | {"rows_per_s": row["img_per_s"], "frames_per_s": row["img_per_s"] * args.video_frames,
                   "frames_per_video": args.video_frames, "frame_px": [args.video_size, args.video_size]}]  # fmt: skip


def measure_pages(vlm: VLM, settings: Settings, args, device: torch.device) -> list[dict]:
    """The engine on one batch of all the pages of a PDF, rendered at pdf_dpi within the pages' pixel budget."""
    if not args.pdf_pages:
        return []
    page_settings = settings.with_overrides({
        "vlm_min_pixels": min(Settings().vlm_min_pixels, args.page_max_pixels),
        "vlm_max_pixels": args.page_max_pixels, "pdf_dpi": args.pdf_dpi,
    })  # fmt: skip
    pages = pdf_pages(args.pdf_pages, args.pdf_dpi, args.page_max_pixels)
    make = engine_call(vlm, pages, make_task("ocr", page_settings).prompt, page_settings)
    row = measure(make, len(pages), args, device)
    return [row | {"rows_per_s": row["img_per_s"], "pages_per_s": row["img_per_s"], "pdf_pages": len(pages),
                   "dpi": args.pdf_dpi, "page_px": [pages[0].width, pages[0].height]}]  # fmt: skip


def describe(args, device: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {len(os.sched_getaffinity(0))} cores"
    model = "tiny Qwen3-VL-MoE" if args.smoke else f"Qwen3-VL-30B-A3B-shaped, {args.text_layers} text layers"
    return {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]), "device": name,
        "torch": torch.__version__, "transformers": transformers.__version__, "model": f"{model}, random weights",
        "image_px": args.image_size, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
    }  # fmt: skip


def print_report(info: dict, results: dict) -> None:
    for key, value in info.items():
        print(f"{key}: {value}")
    print(f"parameters: {results['parameters'] / 1e6:,.1f} M; transformers side experts: {results['stock_experts']}; "
          f"engine side: {results['engine_experts']}, options: {', '.join(results['options']) or 'none'}")  # fmt: skip
    best_stock = max(r["img_per_s"] for r in results["stock"])
    print("\n| side | batch | s per call | img/s | vs transformers best | prefill s | decode ms/step "
          "| new tokens/row | peak GB |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [("transformers generate", r) for r in results["stock"]]
    rows += [("engine VLM.generate", r) for r in results["engine"]]
    for side, r in rows:
        peak = "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        print(f"| {side} | {r['batch']} | {r['s_per_call']:.2f} | {r['img_per_s']:.3f} "
              f"| {r['img_per_s'] / best_stock:.2f}x | {r['prefill_s']:.2f} | {r['decode_ms_per_step']:.1f} "
              f"| {r['new_tokens_per_row']:.0f} | {peak} |")  # fmt: skip
    print(f"targets on one H200 (NOTES, issue): transformers {TARGETS['stock_h200_batch32']} img/s at batch 32, "
          f"goal >= {TARGETS['goal']}")  # fmt: skip
    if not results["video"] and not results["pages"]:
        return
    print("\n| engine VLM.generate on | batch | s per call | rows/s | pages/s or sampled frames/s | prefill s "
          "| decode ms/step | new tokens/row | peak GB |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cases = [(f"videos, {r['frames_per_video']} frames of {r['frame_px'][0]}x{r['frame_px'][1]}", r,
              f"{r['frames_per_s']:.2f} frames/s") for r in results["video"]]  # fmt: skip
    cases += [(f"pages of one {r['pdf_pages']}-page PDF, {r['dpi']:g} dpi, {r['page_px'][0]}x{r['page_px'][1]}", r,
               f"{r['pages_per_s']:.3f} pages/s") for r in results["pages"]]  # fmt: skip
    for label, r, rate in cases:
        peak = "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        print(f"| {label} | {r['batch']} | {r['s_per_call']:.2f} | {r['rows_per_s']:.3f} | {rate} "
              f"| {r['prefill_s']:.2f} | {r['decode_ms_per_step']:.1f} | {r['new_tokens_per_row']:.0f} "
              f"| {peak} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stock-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--engine-batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=1, help="timed full calls per batch size (128 steps each)")
    parser.add_argument("--text-layers", type=int, default=48, help="fewer for a quicker, proportionally faster model")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--experts", default="default", choices=["default", "eager", "batched_mm", "grouped_mm"],
                        help="engine side: transformers' experts implementation")  # fmt: skip
    parser.add_argument("--static-cache", action="store_true", help="engine side: static KV cache")
    parser.add_argument("--compile", default="none",
                        choices=["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="engine side: torch.compile mode of the decode step")  # fmt: skip
    parser.add_argument("--video-batch", type=int, default=8, help="videos in the engine's video batch; 0 skips it")
    parser.add_argument("--video-frames", type=int, default=32, help="sampled frames per video")
    parser.add_argument("--video-size", type=int, default=448, help="frame side, px")
    parser.add_argument("--pdf-pages", type=int, default=20, help="pages of the PDF, all in one batch; 0 skips it")
    parser.add_argument("--pdf-dpi", type=float, default=144)
    parser.add_argument("--page-max-pixels", type=int, default=Settings().vlm_max_pixels,
                        help="pixel budget per page (the standard preset's vlm_max_pixels)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 64 px, 8 tokens, CPU")
    args = parser.parse_args()
    quiet_libraries()
    if args.smoke:
        args.image_size, args.max_new_tokens = 64, 8
        args.stock_batches, args.engine_batches = [1, 2], [2, 4]
        args.video_batch, args.video_frames, args.video_size = min(args.video_batch, 2), 4, 64  # 0 still skips
        args.pdf_pages, args.page_max_pixels = min(args.pdf_pages, 2), 128 * 128
        torch.set_num_threads(1)  # CPU machines here are shared: more threads than free cores slow everything
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: running on CPU; these are not GPU figures", file=sys.stderr)

    results = run(args, device)
    info = describe(args, device)
    print_report(info, results)
    if args.out:
        args.out.write_text(json.dumps({**info, "targets": TARGETS, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
