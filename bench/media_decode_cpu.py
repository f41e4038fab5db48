"""PDF pages and video frames per second in the VLM pass's CPU stage against its model stage (tiny Qwen3-VL, CPU,
one thread): does decoding keep up? One process, no Ray cluster: each stage's own per-batch function.

Input, written once before timing: --pdfs PDFs of --pages A4 pages each, half scanned (samples.media_files.scanned_pdf:
one 620x877 JPEG per page, 75 dpi), half born-digital (text_pdf); --videos videos (640x360, 10 s, 30 fps, .mp4) per
codec in --codecs and picture in --pictures: `flat`, samples.media_files.write_video's test picture (grey and a red
square: ~14 kbit/s in h264, nearly free to decode), and `textured`, a smooth random texture panning 2 px a frame
under fresh grain (~830 kbit/s in h264 at x264's defaults, what a 360p web video has; PyAV's mpeg4 encoder holds
it to ~470 kbit/s). Each file is written once and copied. One table per kind of input, with the `id`, `image`,
`video` columns of a manifest that holds both (URIs of the files; the other column null).
CPU stage: `ray_jobs.passes.analyze.decode_batches`, which each decode task maps over its rows: `row_visuals` (the file
read, PDFium rendering each page at pdf_dpi within vlm_max_pixels, or the video sampled by engine.media.video), then
`fit_pixel_budget`, then the pixels into an Arrow table of vlm_batch_size rows.
Model stage: `ray_jobs.passes.analyze.VLMPredictor`, the model actor's callable: `VLM("tiny", settings)`, loaded once and
not timed; per table, the pixels back into images or `Video`s, one `VLM.generate(visuals, instructions)` of
vlm_batch_size rows, answers parsed. Task --task (ocr), fed exactly the CPU stage's output tables.
Settings: the tiny preset (`load_settings("tiny")`) for both stages; and for the CPU stage alone the standard preset
(`load_settings("standard")`: what a real Qwen3-VL is given, pages at 144 dpi within 1280*32*32 px, videos at 2 fps,
at most 64 frames within 16*1280*32*32 px in all), since the tiny model is not the real one.
Timing: wall seconds, and CPU seconds of this process (time.process_time). Both stages run on one thread here, so
items per CPU-second is the rate per core, and it is what the machine's other jobs disturb least. Rounds interleave
the stages; medians. Source frames decoded per video are counted up to the last sampled frame (decoding stops there).

Prediction, written before measuring.
- PDFs, tiny preset: a page is drawn at ~107x152 px; the cost is PDFium's per-page work, plus for scanned pages the
  JPEG decode, and per file the bomb scan: ~3-8 ms of CPU a page, 120-300 pages per CPU-second, text above scanned.
  Model: OCR of up to 128 tokens, batches of 4, ~12-20 pages/s (bench/vlm_pass_vs_loop.py: 26-34 rows/s at batch 8
  with 12-token images). Ratio CPU / model ~10x (8-25x): one decode core feeds ~10 tiny-model cores.
- Videos, tiny preset: all 300 frames are decoded (the samples reach the last frame) to keep 8, scaled to ~170x96;
  h264 at 360p ~1-2 ms a frame, so 0.3-0.6 CPU-s a video: 2-3 videos, 600-900 source frames and 16-24 sampled
  frames per CPU-second; mpeg4 1.5-2x faster. Model: ~64 visual tokens a video, batches of 4, ~6-10 videos/s.
  Ratio ~0.3x: for video the CPU stage does *not* keep up core for core; ~3 decode cores per tiny-model core.
- Standard preset, CPU stage only: pages drawn at up to 1.31 Mpx, ~20-40 ms each (scanned pages upscale their
  75-dpi JPEG): 25-50 pages per CPU-second. Against the real model on a GPU, ~2-3 img/s per H200 at batch 32-128
  (NOTES; 448 px images, 196 tokens, where such a page is ~1,280), one core feeds ~10-20 GPUs, and even at the
  25 img/s goal ~0.5-1 core per GPU is enough. Videos: the same decoding, 20 frames kept at full size: 2-3 per
  CPU-second; no GPU figure for videos exists yet (bench/gpu_vlm.py's video case).

  (Added after the first run, which measured only the flat picture: the `textured` videos. The figures above for
  video decoding were meant for real footage, which the flat picture is not.)

Run from the repo root (about 1-2 minutes on 2 busy cores; --smoke takes seconds):
    .venv/bin/python bench/media_decode_cpu.py [--pdfs 8] [--pages 10] [--videos 4] [--codecs h264 mpeg4]
        [--pictures flat textured] [--rounds 3] [--task ocr] [--out media.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import av  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.timing import Timing, timed  # noqa: E402
from engine.library_logging import quiet_libraries  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402
from engine.vlm.tasks import make_task  # noqa: E402
from ray_jobs.passes.analyze import VLMPredictor, decode_batches, output_schema  # noqa: E402
from samples.media_files import A4, scanned_pdf, text_pdf, write_video  # noqa: E402

# The real model on one H200 (NOTES: Qwen3-VL-30B-A3B-shaped, 448 px, 128 new tokens) and the goal.
GPU_IMAGES_PER_S = {"H200, batch 32 (NOTES)": 2.04, "H200, batch 128 (NOTES)": 3.08, "goal": 25.0}
MANIFEST = pa.schema([("id", pa.string()), ("image", pa.string()), ("video", pa.string())])


@dataclass
class Media:
    """One kind of input: its manifest table and what one item is."""

    kind: str  # "scanned PDF", "text PDF", "h264 video, flat", ...
    table: pa.Table


@dataclass
class Decoded:
    """What the CPU stage made of one kind of input."""

    rows: int  # pages or videos
    sampled_frames: int
    source_frames: int  # decoded, up to each video's last sampled frame
    errors: list[str]


def write_media(folder: Path, args) -> list[Media]:
    folder.mkdir()
    pdfs = {
        "scanned PDF": scanned_pdf(args.pages),
        "text PDF": text_pdf([A4] * args.pages),
    }
    media = []
    for kind, data in pdfs.items():
        uris = []
        for i in range(args.pdfs // 2):
            path = folder / f"{kind.split()[0]}-{i}.pdf"
            path.write_bytes(data)
            uris.append(str(path))
        media.append(Media(kind, manifest(kind, images=uris)))
    (width, height), fps, seconds = args.video_size, args.video_fps, args.video_seconds
    for codec in args.codecs:
        for picture in args.pictures:
            first = folder / f"{codec}-{picture}-0.mp4"
            if picture == "flat":
                write_video(first, width=width, height=height, fps=fps, seconds=seconds, codec=codec)
            else:
                write_textured_video(first, width=width, height=height, fps=fps, seconds=seconds, codec=codec)
            uris = [str(first)]
            for i in range(1, args.videos):
                uris.append(shutil.copyfile(first, folder / f"{codec}-{picture}-{i}.mp4"))
            kind = f"{codec} video, {picture}"
            media.append(Media(kind, manifest(f"{codec}-{picture}", videos=[str(u) for u in uris])))
    return media


def write_textured_video(path: Path, *, width: int, height: int, fps: int, seconds: float, codec: str) -> Path:
    """A video that costs what footage costs to decode: a smooth random texture panning 2 px a frame (motion to
    predict) under fresh grain of +-8 levels every frame (residuals to code), at the encoder's default quality."""
    rng = np.random.default_rng(0)
    count = round(fps * seconds)
    span = width + 2 * count
    coarse = rng.integers(0, 256, (height // 8 + 1, span // 8 + 1, 3), np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((span, height), Image.Resampling.BICUBIC), np.int16)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(count):
            picture = texture[:, 2 * index : 2 * index + width] + rng.integers(-8, 9, (height, width, 1))
            frame = av.VideoFrame.from_ndarray(np.clip(picture, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def manifest(prefix: str, images: list[str] | None = None, videos: list[str] | None = None) -> pa.Table:
    uris = images or videos
    nulls = [None] * len(uris)
    ids = [f"{prefix.split()[0]}-{i}" for i in range(len(uris))]
    return pa.table({"id": ids, "image": images or nulls, "video": videos or nulls}, schema=MANIFEST)


def decode_stage(table: pa.Table, settings: Settings, keep: bool) -> tuple[Timing, Decoded, list[pa.Table]]:
    """The decode task's function over the whole table; its output tables are kept only for the model stage."""
    kept, rows, sampled, source, errors = [], 0, 0, 0, []
    with timed() as t:
        for out in decode_batches(table, settings):
            rows += out.num_rows
            errors += [e for e in out.column("__decode_error").to_pylist() if e is not None]
            sampled += sum(out.column("__frames").to_pylist())
            source += sum(ix[-1] + 1 for ix in out.column("__frame_indices").to_pylist() if ix)
            if keep:
                kept.append(out)
    return t.timing, Decoded(rows, sampled, source, errors), kept


def model_stage(predictor: VLMPredictor, tables: list[pa.Table]) -> tuple[Timing, int, float]:
    """The model actor's callable over the decoded tables: (timing, rows answered, mean answer tokens)."""
    with timed() as t:
        outputs = [predictor(table) for table in tables]
    errors = [e for out in outputs for e in out.column("error").to_pylist() if e is not None]
    if errors:
        raise RuntimeError(f"the model stage answered with errors: {errors[:3]}")
    tokens = [n for out in outputs for n in out.column("num_output_tokens").to_pylist()]
    return t.timing, len(tokens), statistics.fmean(tokens)


def median_timing(timings: list[Timing]) -> Timing:
    return Timing(statistics.median(t.wall_s for t in timings), statistics.median(t.cpu_s for t in timings))


def measure(media: list[Media], presets: dict[str, Settings], predictor: VLMPredictor, rounds: int) -> list[dict]:
    """Rounds of, for each kind: CPU stage (tiny), model stage (tiny, on that output), CPU stage (standard)."""
    timings: dict[tuple[str, str, str], list[Timing]] = {}
    counts: dict[tuple[str, str, str], dict] = {}
    for _ in range(rounds):
        for m in media:
            for preset, settings in presets.items():
                timing, decoded, tables = decode_stage(m.table, settings, keep=preset == "tiny")
                if decoded.errors:
                    raise RuntimeError(f"{m.kind}, {preset}: decode errors: {decoded.errors[:3]}")
                timings.setdefault((m.kind, preset, "CPU stage"), []).append(timing)
                counts[(m.kind, preset, "CPU stage")] = asdict(decoded) | {"items": decoded.rows}
                if preset == "tiny":
                    timing, answered, tokens = model_stage(predictor, tables)
                    timings.setdefault((m.kind, preset, "model stage"), []).append(timing)
                    counts[(m.kind, preset, "model stage")] = {"items": answered, "answer_tokens": tokens}
    results = []
    for (kind, preset, stage), runs in timings.items():
        t, c = median_timing(runs), counts[(kind, preset, stage)]
        results.append({
            "input": kind, "preset": preset, "stage": stage, "wall_s": t.wall_s, "cpu_s": t.cpu_s,
            "per_s": c["items"] / t.wall_s, "per_cpu_s": c["items"] / t.cpu_s,
            "rounds_wall_s": [r.wall_s for r in runs], **c,
        })  # fmt: skip
    return results


def ratios(results: list[dict]) -> list[dict]:
    """CPU-stage rate over model-stage rate (per core) for the tiny preset; cores per GPU for the standard one."""
    by = {(r["input"], r["preset"], r["stage"]): r for r in results}
    out = []
    for (kind, preset, stage), r in by.items():
        if stage != "CPU stage":
            continue
        row = {"input": kind, "preset": preset, "cpu_stage_per_core": r["per_cpu_s"]}
        model = by.get((kind, preset, "model stage"))
        if model is not None:
            row |= {"model_stage_per_core": model["per_cpu_s"], "ratio": r["per_cpu_s"] / model["per_cpu_s"]}
        if preset == "standard":  # for videos an upper bound: a GPU answers fewer videos than 448 px images a second
            row["cores_per_gpu"] = {name: rate / r["per_cpu_s"] for name, rate in GPU_IMAGES_PER_S.items()}
        out.append(row)
    return out


def print_report(info: dict, results: list[dict], summary: list[dict]) -> None:
    for key, value in info.items():
        print(f"{key}: {value}")
    print("\n| input | preset | stage | items | wall s | CPU s | items/s (wall) | items per CPU-s "
          "| sampled frames per CPU-s | source frames per CPU-s | s per round (wall) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        frames = (f"{r['sampled_frames'] / r['cpu_s']:.0f} | {r['source_frames'] / r['cpu_s']:.0f}"
                  if r.get("sampled_frames") else "| ")  # fmt: skip
        each = ", ".join(f"{s:.2f}" for s in r["rounds_wall_s"])
        print(f"| {r['input']} | {r['preset']} | {r['stage']} | {r['items']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} "
              f"| {r['per_s']:.1f} | {r['per_cpu_s']:.1f} | {frames} | {each} |")  # fmt: skip
    print("\n| input | preset | CPU stage per core | model stage per core | CPU / model |")
    print("| --- | --- | --- | --- | --- |")
    for s in summary:
        model = f"{s['model_stage_per_core']:.1f} | {s['ratio']:.2f}x" if "ratio" in s else "(tiny model only) | "
        print(f"| {s['input']} | {s['preset']} | {s['cpu_stage_per_core']:.1f} | {model} |")
    print("\nDecode cores per GPU at the standard budget: the real model's img/s over the CPU stage's items per CPU-s "
          "(for videos an upper bound: a video is ~10x an image's tokens)")  # fmt: skip
    print("\n| input | " + " | ".join(f"{name}: {rate} img/s" for name, rate in GPU_IMAGES_PER_S.items()) + " |")
    print("| --- |" + " --- |" * len(GPU_IMAGES_PER_S))
    for s in summary:
        if "cores_per_gpu" in s:
            print(f"| {s['input']} | " + " | ".join(f"{c:.2f}" for c in s["cores_per_gpu"].values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdfs", type=int, default=8, help="half scanned, half born-digital")
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--videos", type=int, default=4, help="per codec")
    parser.add_argument("--codecs", nargs="+", default=["h264", "mpeg4"])
    parser.add_argument("--pictures", nargs="+", choices=["flat", "textured"], default=["flat", "textured"])
    parser.add_argument("--video-size", type=int, nargs=2, default=[640, 360])
    parser.add_argument("--video-fps", type=int, default=30)
    parser.add_argument("--video-seconds", type=float, default=10.0)
    parser.add_argument("--task", choices=["caption", "ocr"], default="ocr")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--smoke", action="store_true", help="2 PDFs of 2 pages, 1 short small video, 8 tokens")
    args = parser.parse_args()
    tiny_overrides = {}
    if args.smoke:
        args.pdfs, args.pages, args.videos, args.codecs, args.rounds = 2, 2, 1, args.codecs[:1], 1
        args.video_size, args.video_seconds = [160, 90], 2.0
        tiny_overrides = {"vlm_max_new_tokens": 8}
    torch.set_num_threads(args.threads)
    quiet_libraries()
    load_before = os.getloadavg()[0]
    presets = {"tiny": load_settings("tiny", overrides=tiny_overrides), "standard": load_settings("standard")}
    task = make_task(args.task, presets["tiny"])
    with tempfile.TemporaryDirectory(prefix="bench-media-") as work:
        media = write_media(Path(work) / "media", args)
        with timed() as load:
            predictor = VLMPredictor("tiny", presets["tiny"], {"name": args.task}, output_schema(MANIFEST, task))
        results = measure(media, presets, predictor, args.rounds)
    summary = ratios(results)
    tiny, standard = presets["tiny"], presets["standard"]
    info = {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "machine": f"{len(os.sched_getaffinity(0))} CPU cores, torch {torch.__version__}, {args.threads} torch "
                   f"thread(s), 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        "input": f"{args.pdfs // 2} scanned + {args.pdfs // 2} text PDFs of {args.pages} A4 pages; {args.videos} "
                 f"video(s) per codec {args.codecs}, {args.video_size[0]}x{args.video_size[1]}, "
                 f"{args.video_seconds:g} s, {args.video_fps} fps, pictures {args.pictures}, each file written once "
                 f"and copied",
        "tiny preset": f"pages {tiny.pdf_dpi:g} dpi within {tiny.vlm_max_pixels} px; videos {tiny.video_fps:g} fps, "
                       f"<= {tiny.video_max_frames} frames within {tiny.video_max_pixels} px; vlm_batch_size "
                       f"{tiny.vlm_batch_size}; task {args.task}, <= {tiny.vlm_max_new_tokens} new tokens, greedy",
        "standard preset": f"pages {standard.pdf_dpi:g} dpi within {standard.vlm_max_pixels} px; videos "
                           f"{standard.video_fps:g} fps, <= {standard.video_max_frames} frames within "
                           f"{standard.video_max_pixels} px; vlm_batch_size {standard.vlm_batch_size}",
        "model load (untimed in the rates)": f"{load.timing.wall_s:.1f} s",
        "rounds": f"{args.rounds} (medians)",
    }  # fmt: skip
    print_report(info, results, summary)
    if args.out:
        args.out.write_text(json.dumps({**info, "gpu_images_per_s": GPU_IMAGES_PER_S, "results": results,
                                        "ratios": summary}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
