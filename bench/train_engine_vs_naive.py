"""Seconds per DreamBooth step on the `tiny` model, CPU: the engine's `train_subject` against the naive loop.

The naive loop (bench/stock_dreambooth.py) is what a user writes from diffusers' train_dreambooth.py: every step
re-reads one instance and one class image, encodes both through the VAE and both prompts through the text encoder.
The engine encodes them once, before the loop. Both sides get the same Settings (tiny preset, prior preservation
on, 1 instance + 1 class per step, same LoRA rank/alpha, learning rate, AdamW), the same subject and class images,
in one process, interleaved step by step (a naive step runs after each engine step, from its on_step callback), so
a change in the machine's load hits both sides alike. The first `--warmup` steps are dropped; medians of the rest
are reported, and the median of the per-step ratios (each naive step over the engine step just before it). So is
each side's CPU time per step, which other jobs on a shared machine disturb far less than wall time.

Prediction, written before measuring. FLOPs counted with torch's FlopCounterMode (not timed): UNet forward
328 MFLOP for the batch of 2 at 16x16 latents (461 aten ops), VAE encoder 320 MFLOP for 2 images at 32 px (94 ops),
text encoder 5 MFLOP for 2 prompts (94 ops). A LoRA step is about forward plus an input-gradient backward,
~660 MFLOP; a full step ~980 MFLOP (1,483 ops) plus AdamW over 0.8 M weights. The naive loop adds ~325 MFLOP,
~190 ops and two tiny PNG decodes per step. By FLOPs that is naive/engine ~1.5 for LoRA and ~1.33 for full; the
VAE's few large convolutions run faster per FLOP than the UNet's many small ops, so I predict a little less:
~1.4x for LoRA and ~1.3x for full.

Run from the repo root (about a minute on 2 cores):
    .venv/bin/python bench/train_engine_vs_naive.py [--modes lora full] [--steps 100] [--warmup 10] [--threads 1]
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

import torch  # noqa: E402

from bench.ball_subject import CLASS_PROMPT, PROMPT, draw_subject  # noqa: E402
from bench.stock_dreambooth import StockDreamBooth  # noqa: E402
from engine.diffusion.base_model import BaseModel, load_base_model, resolve_base_model  # noqa: E402
from engine.diffusion.class_images import ClassImageCache  # noqa: E402
from engine.diffusion.subject import Subject  # noqa: E402
from engine.diffusion.train import StepRecord, train_subject  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402

SEED = 7


def interleaved_steps(base: BaseModel, subject: Subject, settings: Settings, class_uris: list[str]) -> list[dict]:
    """One engine run of `train_subject`; after each of its steps, one naive step, so both see the same machine load.

    Wall time: the engine's is its own StepRecord.seconds; the naive step runs inside on_step, outside that window.
    CPU time of this process (one torch thread) is also kept per step: other jobs on the machine stretch wall time
    but hardly change it. The engine's CPU time is everything between two naive steps.
    """
    naive = StockDreamBooth(
        base.path, settings, list(subject.instance_images), class_uris, (PROMPT, CLASS_PROMPT), base.device, SEED
    )
    steps = []
    naive_ended_cpu = time.process_time()

    def naive_step(record: StepRecord) -> None:
        nonlocal naive_ended_cpu
        began, began_cpu = time.perf_counter(), time.process_time()
        loss = naive.step()
        ended_cpu = time.process_time()
        steps.append({
            "engine": record.seconds, "naive": time.perf_counter() - began,
            "engine_cpu": began_cpu - naive_ended_cpu, "naive_cpu": ended_cpu - began_cpu,
            "engine_loss": record.loss, "naive_loss": loss,
        })  # fmt: skip
        naive_ended_cpu = ended_cpu

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as subject_dir:
        train_subject(base, subject, settings, subject_dir, class_uris, on_step=naive_step)
    return steps


def summarise(steps: list[dict], warmup: int) -> dict:
    timed = steps[warmup:]
    medians = {key: statistics.median(s[key] for s in timed) for key in ("engine", "naive", "engine_cpu", "naive_cpu")}
    ratios = sorted(s["naive"] / s["engine"] for s in timed)
    return {
        **medians,
        "ratio": medians["naive"] / medians["engine"],
        "cpu_ratio": medians["naive_cpu"] / medians["engine_cpu"],
        "paired_ratio": statistics.median(ratios),
        "paired_iqr": (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]),
        "last_losses": {side: statistics.fmean(s[f"{side}_loss"] for s in steps[-10:]) for side in ("engine", "naive")},
    }


def print_table(results: dict[str, dict]) -> None:
    print(
        "| mode | engine s/step | naive s/step | naive / engine | per-step paired ratio, median [IQR] "
        "| engine CPU s/step | naive CPU s/step | naive / engine, CPU time | loss, last 10 steps (engine / naive) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        low, high = r["paired_iqr"]
        losses = f"{r['last_losses']['engine']:.3f} / {r['last_losses']['naive']:.3f}"
        print(
            f"| {mode} | {r['engine']:.4f} | {r['naive']:.4f} | {r['ratio']:.2f}x "
            f"| {r['paired_ratio']:.2f}x [{low:.2f}-{high:.2f}] | {r['engine_cpu']:.4f} | {r['naive_cpu']:.4f} "
            f"| {r['cpu_ratio']:.2f}x | {losses} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--steps", type=int, default=100, help="steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped from the start of every run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    base = load_base_model(resolve_base_model("tiny"), "cpu")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as work:
        images = draw_subject(Path(work) / "subject")
        subject = Subject("ball", tuple(images), PROMPT, CLASS_PROMPT, seed=SEED)
        for mode in args.modes:
            # checkpointing_steps = steps: the one checkpoint comes after the last step, outside any step's time
            settings = load_settings("tiny", overrides={"mode": mode, "max_train_steps": args.steps,
                                                        "checkpointing_steps": args.steps})  # fmt: skip
            class_uris = ClassImageCache(str(Path(work) / "class_images")).ensure(base, CLASS_PROMPT, settings).uris
            results[mode] = summarise(interleaved_steps(base, subject, settings, class_uris), args.warmup)

    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {len(os.sched_getaffinity(0))} CPU cores (nproc), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s), 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")  # fmt: skip
    print(f"tiny model, {args.steps} steps per run, first {args.warmup} dropped (medians of "
          f"{args.steps - args.warmup}), batch 1 instance + 1 class, prior preservation on\n")  # fmt: skip
    print_table(results)


if __name__ == "__main__":
    main()
