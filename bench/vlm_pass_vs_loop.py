"""Rows per second of `dreamfleet analyze` (the Ray Data pass) against a plain per-image transformers loop, on the
`tiny` Qwen3-VL, CPU.

Input: --rows synthetic document images (PNG receipts drawn with PIL, 128x96: 12 image tokens, inside the tiny
preset's pixel budget, so neither side resizes them and both feed the model the same pixels) and a manifest of paths.
Pass: `ray_jobs.passes.analyze.analyze` with the tiny preset (128 new tokens at most, greedy, 32x32 to 128x128 px budget)
and vlm_batch_size 8, on a local Ray cluster started once (`ray.init`, timed on its own): read Parquet, decode on CPU
tasks, one VLM actor answering 8 rows per `generate`, part files written by Ray Data's write tasks. The manifest is a
folder of 4 Parquet files.
Loop, what a user writes: AutoProcessor + AutoModelForImageTextToText from the same tiny model directory, loaded
once (untimed), then for each image: open it, apply the chat template with the task's instruction, one
`generate(max_new_tokens=128, do_sample=False)`, decode. Same pixel budget as the pass.
Between them, to split the pass's time into batching and Ray: the engine's own `VLM.generate` on batches of 8 in
this process (what each pass's actor runs, without Ray Data, actor start or model load).
Rounds: loop, engine, pass, repeated --rounds times, so all see the machine's load alike; each pass writes a new
OUTPUT. Reported: rows/s of each, the pass with and without Ray's start-up, answer tokens per row on each side, and
how many answers equal the loop's (batched rows are decoded together, the loop's one at a time).

Prediction, written before measuring. The tiny model's decode step is overhead-bound (a few ms of Python and small
kernels whatever the batch), so a batch of 8 costs little more than one row: the model work alone should be ~4-6x
faster in the pass. Fixed costs eat into that: Ray Data's start of each pass (plan, actor start, model load in the
actor, ~5-10 s on 2 busy cores), and decode tasks and Ray's own processes competing with the model for 2 cores.
I expect the in-process engine at ~4x the loop, the pass at ~2-3x the loop's rows/s at 32 rows excluding `ray.init`,
~1.5x including it, and most answers equal (batched float32 kernels can flip a near-tie).

Run from the repo root (2-3 minutes on 2 cores):
    .venv/bin/python bench/vlm_pass_vs_loop.py [--task caption] [--rows 32] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # Ray workers

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from engine.library_logging import quiet_libraries  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402
from engine.vlm.chat import pixel_budget, resolve_vlm  # noqa: E402
from engine.vlm.tasks import make_task  # noqa: E402
from ray_jobs.passes.analyze import AnalyzeRequest, analyze  # noqa: E402
from samples.receipts import draw_receipts, write_images_manifest  # noqa: E402

ANSWER_COLUMN = {"caption": "caption", "ocr": "text"}


class PerImageLoop:
    """The user's loop: one processor call and one `generate` per image."""

    def __init__(self, model_dir: Path, settings: Settings, instruction: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self.budget = pixel_budget(settings)
        self.max_new_tokens = settings.vlm_max_new_tokens

    def __call__(self, image_path: str) -> tuple[str, int]:
        image = Image.open(image_path).convert("RGB")
        inputs = self.processor(text=[self.prompt], images=[image], return_tensors="pt", **self.budget)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.decode(new, skip_special_tokens=True).strip(), len(new)


def loop_round(loop: PerImageLoop, images: list[str]) -> tuple[float, dict[str, str], list[int]]:
    began = time.perf_counter()
    answers = [loop(path) for path in images]
    seconds = time.perf_counter() - began
    return seconds, {Path(p).stem: a for p, (a, _) in zip(images, answers)}, [n for _, n in answers]


def engine_round(vlm, task, images: list[str], batch_size: int) -> tuple[float, dict[str, str], list[int]]:
    """The pass's model work without Ray: the engine's VLM.generate on batches of `batch_size`, in this process."""
    began = time.perf_counter()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = [Image.open(p).convert("RGB") for p in images[start : start + batch_size]]
        outputs.extend(vlm.generate(batch, task.prompt))
    seconds = time.perf_counter() - began
    answers = {Path(p).stem: next(iter(task.parse(o, None).values())) for p, o in zip(images, outputs)}
    return seconds, answers, [o.num_output_tokens for o in outputs]


def pass_round(manifest: str, out: Path, task: str, settings: Settings) -> tuple[float, dict[str, str], list[int]]:
    began = time.perf_counter()
    status = analyze(AnalyzeRequest(input=manifest, task=task, out=str(out), settings=settings, show_progress=False))
    seconds = time.perf_counter() - began
    table = pq.read_table(out)
    if status != 0:
        raise RuntimeError(f"the pass reported row errors: {table.column('error').to_pylist()[:3]}")
    answers = dict(zip(table.column("id").to_pylist(), table.column(ANSWER_COLUMN[task]).to_pylist()))
    return seconds, answers, table.column("num_output_tokens").to_pylist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(ANSWER_COLUMN), default="caption")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of loop, in-process engine, pass")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, here and in Ray's workers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by Ray's workers, where torch reads it
    quiet_libraries()
    import ray

    from engine.vlm.model import VLM

    load_before = os.getloadavg()[0]
    settings = load_settings("tiny", overrides={"vlm_batch_size": 8})
    task = make_task(args.task, settings)
    loop = PerImageLoop(resolve_vlm("tiny"), settings, task.prompt)
    vlm = VLM("tiny", settings, "cpu")
    sides: dict[str, list] = {"loop": [], "engine": [], "pass": []}
    with tempfile.TemporaryDirectory(prefix="bench-vlm-") as work:
        images = draw_receipts(Path(work) / "docs", args.rows)
        manifest = write_images_manifest(Path(work) / "manifest", images)
        began = time.perf_counter()
        ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)  # fmt: skip
        ray_start = time.perf_counter() - began
        for r in range(args.rounds):
            sides["loop"].append(loop_round(loop, images))
            sides["engine"].append(engine_round(vlm, task, images, settings.vlm_batch_size))
            sides["pass"].append(pass_round(manifest, Path(work) / f"out-{r}.parquet", args.task, settings))
        ray.shutdown()
    print_report(args, settings, sides, ray_start, load_before, ray.__version__)


def print_report(args, settings: Settings, sides: dict[str, list], ray_start: float, load_before: float,
                 ray_version: str) -> None:  # fmt: skip
    median = {side: statistics.median(s for s, _, _ in rounds) for side, rounds in sides.items()}
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {len(os.sched_getaffinity(0))} CPU cores, torch {torch.__version__}, ray {ray_version}, "
          f"{args.threads} torch thread(s) here and in Ray's workers, 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")  # fmt: skip
    print(f"tiny Qwen3-VL, task {args.task}, {args.rows} rows, max {settings.vlm_max_new_tokens} new tokens, greedy, "
          f"vlm_batch_size {settings.vlm_batch_size}, {args.rounds} rounds (medians)\n")  # fmt: skip
    print("| side | s for all rows | rows/s | vs loop | answer tokens per row (mean) | answers equal to the loop's "
          "| s per round |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = [
        ("per-image transformers loop", "loop", median["loop"]),
        ("engine VLM.generate, batches of 8, in process, no Ray", "engine", median["engine"]),
        ("Ray Data pass (analyze), Ray already up", "pass", median["pass"]),
        ("Ray Data pass + ray.init", "pass", median["pass"] + ray_start),
    ]
    reference = sides["loop"][-1][1]
    for label, side, seconds in rows:
        tokens = statistics.fmean(n for _, _, counts in sides[side] for n in counts)
        equal = sum(sides[side][-1][1][k] == v for k, v in reference.items())
        each = ", ".join(f"{s:.1f}" for s, _, _ in sides[side])
        print(f"| {label} | {seconds:.2f} | {args.rows / seconds:.2f} | {median['loop'] / seconds:.2f}x "
              f"| {tokens:.1f} | {equal}/{args.rows} | {each} |")  # fmt: skip
    print(f"\nray.init: {ray_start:.1f} s, once, before the first round.")


if __name__ == "__main__":
    main()
