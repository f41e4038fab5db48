"""Packed LoRA training and generation on a tiny model, CPU, one torch thread: cost per subject against one at a time.

Training: N subjects (drawn balls, each its own shift and colour, its own seed), the tiny preset with prior
preservation on (one shared class set, made before any timing), `--steps` steps each, trained
  (a) one at a time with `train_subject` (the stock per-subject loop a worker ran before packing), then
  (b) with `train_pack(base, jobs, capacity=K)` for each K of `--packs`.
Each variant is timed whole, examples encoding, checkpoints and exports included: that is what a subject costs a
worker. Wall seconds and CPU seconds of this process (time.process_time; one torch thread, so CPU time is what a
fleet worker's core spends, and other jobs on the machine stretch it far less than wall time).

Generation: the subjects trained in (a), `--prompts` prompts × the tiny preset's images per prompt each, tiny
defaults (10 DDIM steps, CFG, generation_batch_size 8), rendered
  (a) one subject at a time: `load_subject_weights` + `render_subject`, then `base.reset()`, against
  (b) all of them in the slots of one `attach_lora_pack(base, settings, capacity=N)` through one `render_pack`.

`--base-model tiny-flux` measures the same on the FLUX family (a FluxTransformer2DModel with the guidance embedding
on, flow matching, LoRA on the attention and feed-forward layers of both block kinds, max_sequence_length 32,
FlowMatch Euler at guidance embedding 3.5); the tiny preset of whichever base is named.

Run from the repo root (a few minutes on 2 cores):
    .venv/bin/python bench/pack_training_cpu.py [--base-model tiny] [--subjects 8] [--steps 40] [--packs 1 2 4 8]
        [--rounds 1]
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

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench.timing import Timing, timed  # noqa: E402
from engine.diffusion.base_model import BaseModel, load_base_model, resolve_base_model  # noqa: E402
from engine.diffusion.class_images import ClassImageCache  # noqa: E402
from engine.diffusion.families import family_of  # noqa: E402
from engine.diffusion.generation import RenderJob, render_pack, render_subject  # noqa: E402
from engine.diffusion.subject import Subject  # noqa: E402
from engine.diffusion.train import PackJob, train_pack, train_subject  # noqa: E402
from engine.diffusion.weights import attach_lora_pack, load_subject_weights  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402

PROMPT, CLASS_PROMPT = "a photo of sks ball", "a photo of a ball"
PROMPTS = ("a photo of sks ball on the beach", "a painting of sks ball")


def draw_ball(folder: Path, index: int, count: int = 4, size: tuple[int, int] = (48, 40)) -> tuple[str, ...]:
    """Subject `index`: `count` PNGs of a ball on blue (as tests/conftest.py draws it), its own colour and place."""
    folder.mkdir(parents=True, exist_ok=True)
    fill = (240, 200 - 20 * (index % 8), 20 + 25 * (index % 8))
    scale = size[0] / 48
    paths = []
    for k in range(count):
        image = Image.new("RGB", size, (30, 60, 200))
        shift = (index + k) % 10
        box = ((4 + shift) * scale, 6 * scale, (34 + shift) * scale, 34 * scale)
        ImageDraw.Draw(image).ellipse(box, fill=fill)
        path = folder / f"{k}.png"
        image.save(path)
        paths.append(str(path))
    return tuple(paths)


def make_subjects(work: Path, count: int) -> list[Subject]:
    return [
        Subject(f"s{i}", draw_ball(work / "images" / f"s{i}", i), PROMPT, CLASS_PROMPT, prompts=PROMPTS, seed=100 + i)
        for i in range(count)
    ]


def train_one_at_a_time(base: BaseModel, subjects, settings, class_uris, out: Path) -> tuple[Timing, list[str]]:
    with timed() as t:
        weights = [
            train_subject(base, s, settings, str(out / s.subject_id), class_uris).weights_uri for s in subjects
        ]
    return t.timing, weights


def train_packed(base: BaseModel, subjects, settings, class_uris, out: Path, capacity: int) -> Timing:
    jobs = [PackJob(s, settings, str(out / s.subject_id), class_uris) for s in subjects]
    with timed() as t:
        ended = train_pack(base, jobs, capacity)
    errors = [e.error for e in ended if e.error is not None]
    if errors or len(ended) != len(subjects):
        raise RuntimeError(f"K={capacity}: {len(ended)} ended, errors {errors}")
    return t.timing


def render_one_at_a_time(base: BaseModel, subjects, settings, weights, out: Path) -> Timing:
    with timed() as t:
        for subject, uri in zip(subjects, weights):
            load_subject_weights(base, settings, uri)
            render_subject(base, subject, settings, str(out / subject.subject_id))
            base.reset()
    return t.timing


def render_packed(base: BaseModel, subjects, settings, weights, out: Path) -> Timing:
    with timed() as t:
        attach_lora_pack(base, settings, capacity=len(subjects))
        for slot, uri in enumerate(weights):
            load_subject_weights(base, settings, uri, slot=slot)
        jobs = [RenderJob(s, settings, str(out / s.subject_id), slot) for slot, s in enumerate(subjects)]
        render_pack(base, jobs)
        base.reset()
    return t.timing


def run_round(base, subjects, settings, class_uris, packs, work: Path, n: int) -> dict:
    """One of each variant, in a fresh folder (nothing resumes from an earlier round's checkpoints)."""
    train: dict[str, Timing] = {}
    train["one at a time"], weights = train_one_at_a_time(base, subjects, settings, class_uris, work / "alone")
    for k in packs:
        train[f"K={k}"] = train_packed(base, subjects, settings, class_uris, work / f"pack{k}", k)
    gen = {
        "one at a time": render_one_at_a_time(base, subjects, settings, weights, work / "gen-alone"),
        f"packed, {n} slots": render_packed(base, subjects, settings, weights, work / "gen-packed"),
    }
    return {"train": train, "gen": gen}


def median_timing(timings: list[Timing]) -> Timing:
    return Timing(statistics.median(t.wall_s for t in timings), statistics.median(t.cpu_s for t in timings))


def print_tables(rounds: list[dict], n: int, images: int) -> None:
    train = {name: median_timing([r["train"][name] for r in rounds]) for name in rounds[0]["train"]}
    base_cpu = train["one at a time"].cpu_s
    print(f"\nTraining, {n} subjects (medians over {len(rounds)} round(s))\n")
    print("| variant | wall s | CPU s | CPU s per subject | subjects per CPU-hour | vs one at a time (CPU) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, t in train.items():
        print(f"| {name} | {t.wall_s:.1f} | {t.cpu_s:.1f} | {t.cpu_s / n:.2f} | {3600 * n / t.cpu_s:,.0f} "
              f"| {base_cpu / t.cpu_s:.2f}x |")  # fmt: skip
    gen = {name: median_timing([r["gen"][name] for r in rounds]) for name in rounds[0]["gen"]}
    base_cpu = gen["one at a time"].cpu_s
    print(f"\nGeneration, {images} images ({n} subjects)\n")
    print("| variant | wall s | CPU s | images/s (wall) | images per CPU-second | vs one at a time (CPU) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, t in gen.items():
        print(f"| {name} | {t.wall_s:.2f} | {t.cpu_s:.2f} | {images / t.wall_s:.1f} | {images / t.cpu_s:.1f} "
              f"| {base_cpu / t.cpu_s:.2f}x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--base-model", default="tiny", help="a tiny base: tiny, tiny-sdxl, tiny-flux, tiny-flux2")
    parser.add_argument("--steps", type=int, default=40, help="training steps per subject (tiny default: 100)")
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8], help="capacities K to measure")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every variant; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a fleet worker has one core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_base_model(resolve_base_model(args.base_model), "cpu")
    settings: Settings = load_settings(args.base_model, overrides={"max_train_steps": args.steps})
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        work = Path(tmp)
        subjects = make_subjects(work, args.subjects)
        # One class set for every subject and round, made before any timing (a fleet makes it once per run).
        class_uris = ClassImageCache(str(work / "class_images")).ensure(base, CLASS_PROMPT, settings).uris
        load_before = os.getloadavg()[0]
        rounds = [
            run_round(base, subjects, settings, class_uris, args.packs, work / f"round{r}", args.subjects)
            for r in range(args.rounds)
        ]
    images = args.subjects * len(PROMPTS) * settings.num_images_per_prompt
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); 1-min load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")  # fmt: skip
    print(f"settings: {args.base_model} preset, max_train_steps {args.steps}, prior preservation on "
          f"({len(class_uris)} class images), checkpointing_steps {settings.checkpointing_steps}, resolution "
          f"{settings.resolution}, max_sequence_length {settings.max_sequence_length}, generation_batch_size "
          f"{settings.generation_batch_size}, {settings.num_inference_steps} {family_of(base).sampler(settings)} steps")
    print_tables(rounds, args.subjects, images)


if __name__ == "__main__":
    main()
