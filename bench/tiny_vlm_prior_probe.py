"""Probe: can the tiny Qwen3-VL (engine/tiny/vlm.py) learn tiny-prior's drawn world in a few CPU minutes, answering
what shape an image shows and where (Qwen3-VL grounding, 0-1000 coordinates)? Issue 27 wanted such a model as a
`--vlm-model` for curation tests; figures and the verdict are in bench/RESULTS.md ("A tiny VLM that has learned
something").

Dataset: one shape of engine/tiny/prior.py's classes (ball, box, star, ring, each in its band of hues), drawn by its
own function into a tile pasted at a random place on a canvas of 64, 96 or 128 px filled with the tile's background.
Answers in the formats the VLM tasks decode: `detect` for a random subset of the classes in random order (the box
when the shape's class is among them, else `[]`), and `caption` ("a photo of a <class>"). Training: the whole model,
teacher-forced on the answer tokens, 1 CPU thread. Evaluation: held-out drawings through the project's own VLM
class, detect task and grammar (engine/vlm), greedy: right class, and IoU > 0.5 with the true box.

Run from the repo root (pin it to one core to measure, e.g. `taskset -c 0`):
    .venv/bin/python bench/tiny_vlm_prior_probe.py --steps 1200 --out /tmp/tiny-vlm-prior
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.library_logging import quiet_libraries
from engine.tiny.prior import CLASSES, draw_class_image
from engine.vlm.tasks.caption import PROMPT as CAPTION_PROMPT
from engine.vlm.tasks.detect import PROMPT as DETECT_TASK_PROMPT
from engine.tiny.vlm import build_config, build_generation_config, build_processor, build_tokenizer

BUILD_THREADS = 1

CANVAS_SIZES = (64, 96, 128)  # square canvases: 2x2 to 4x4 image tokens at Qwen3-VL's 32 px per token
TILE_FRACTION = (0.45, 0.8)  # the shape's tile, as a fraction of the canvas side
TASK_WEIGHTS = {"detect": 0.9, "caption": 0.1}
STEPS, BATCH, LEARNING_RATE, WARMUP = 1200, 16, 3e-3, 100

# The task prompts as engine/vlm/tasks write them by default, so the pass asks what the model learned.
DETECT_PROMPT = DETECT_TASK_PROMPT
SCALE = 1000


def caption_of(name: str) -> str:
    return f"a photo of a {name}"


def shape_box(tile: Image.Image) -> tuple[int, int, int, int]:
    """The shape's bounding box in a tile: every pixel away from the background colour (its corner's), in pixels
    (x1, y1, x2, y2), x2 and y2 exclusive."""
    pixels = np.asarray(tile, dtype=np.int16)
    distance = np.abs(pixels - pixels[0, 0]).sum(axis=-1)
    ys, xs = np.nonzero(distance > 48)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def draw_scene(rng: random.Random, name: str | None = None, size: int | None = None):
    """One drawing: (image, class, box relative 0-1000 as x1, y1, x2, y2)."""
    name = name or rng.choice(CLASSES)
    size = size or rng.choice(CANVAS_SIZES)
    tile_side = max(16, round(size * rng.uniform(*TILE_FRACTION)))
    tile = draw_class_image(name, rng, size=tile_side)
    canvas = Image.new("RGB", (size, size), tile.getpixel((0, 0)))
    left, top = rng.randint(0, size - tile_side), rng.randint(0, size - tile_side)
    canvas.paste(tile, (left, top))
    x1, y1, x2, y2 = shape_box(tile)
    box = [round((v + offset) * SCALE / size) for v, offset in ((x1, left), (y1, top), (x2, left), (y2, top))]
    return canvas, name, box


def detect_answer(name: str, box: list[int], categories: list[str]) -> str:
    """What the detect task's grammar lets a model say, as json.dumps writes it: the box when asked for its class."""
    return json.dumps([{"bbox_2d": box, "label": name}] if name in categories else [])


def draw_example(rng: random.Random) -> tuple[Image.Image, str, str]:
    """(image, instruction, answer) of one training or test example."""
    image, name, box = draw_scene(rng)
    task = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
    if task == "detect":
        # Mostly the shape's own class among others: the class noun alone (curation asks so), or several
        categories = rng.sample(CLASSES, rng.randint(1, len(CLASSES)))
        if name not in categories and rng.random() < 0.7:
            categories[rng.randrange(len(categories))] = name
        return image, DETECT_PROMPT.replace("{categories}", ", ".join(categories)), detect_answer(name, box, categories)
    return image, CAPTION_PROMPT, caption_of(name)


def _batch(processor, rng: random.Random, count: int) -> dict[str, torch.Tensor]:
    """A teacher-forced batch: chat prompt + answer + <|im_end|>, loss on the answer and its end only."""
    examples = [draw_example(rng) for _ in range(count)]
    prompts, answers = [], []
    for image, instruction, answer in examples:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        answers.append(answer + "<|im_end|>")
    full = processor(text=[p + a for p, a in zip(prompts, answers)], images=[e[0] for e in examples],
                     padding=True, return_tensors="pt")  # fmt: skip
    tokenizer = processor.tokenizer
    answer_lengths = [len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers]
    labels = torch.full_like(full["input_ids"], -100)
    for row, length in enumerate(answer_lengths):  # left padding: every answer ends its row
        labels[row, -length:] = full["input_ids"][row, -length:]
    return {**full, "labels": labels}


def _train(model, processor, rng: random.Random, steps: int) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * max(0.05, 1 - s / steps)
    )
    losses = []
    for _ in range(steps):
        batch = _batch(processor, rng, BATCH)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny_vlm_prior(path: Path, seed: int = 0, steps: int = STEPS) -> list[float]:
    """Write the tiny-prior VLM directory at `path`, trained `steps` steps from `seed`; the training losses."""
    from transformers import Qwen3VLForConditionalGeneration

    quiet_libraries()
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        tokenizer = build_tokenizer(thinking=False)
        processor = build_processor(tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen3VLForConditionalGeneration(build_config(tokenizer, moe=False))
            losses = _train(model, processor, random.Random(seed), steps)
        model.generation_config = build_generation_config(tokenizer, thinking=False)
        model.save_pretrained(path, safe_serialization=True)
        processor.save_pretrained(path)
    finally:
        torch.set_num_threads(threads)
    return losses


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union else 0.0


def evaluate(path: Path, count: int, seed: int) -> tuple[int, int]:
    """(right class, right class with IoU > 0.5) over `count` held-out drawings, through engine/vlm as a pass runs."""
    from engine.settings import load_settings
    from engine.vlm.constrained import GrammarCompiler
    from engine.vlm.model import VLM
    from engine.vlm.tasks import make_task
    from engine.vlm.tasks.base import RowRequest

    settings = load_settings("tiny")
    vlm = VLM(str(path), settings, device="cpu")
    task = make_task(name="detect", settings=settings, schema_file=None, policy_file=None, question=None,
                     categories=",".join(CLASSES))  # fmt: skip
    task.prepare(vlm)
    grammars = GrammarCompiler(vlm.processor.tokenizer, vlm.vocab_size)
    rng = random.Random(seed)
    scenes = [draw_scene(rng) for _ in range(count)]
    requests = [RowRequest(image.width, image.height, None, None) for image, _, _ in scenes]
    outputs = vlm.generate([s[0] for s in scenes], [task.instruction(r) for r in requests],
                           grammars.processor_factory([task.grammar(r) for r in requests]))  # fmt: skip
    right = located = 0
    for (image, name, box), output, request in zip(scenes, outputs, requests):
        truth = [v * image.width / SCALE for v in box]
        found = [b for b in task.parse(output, request)["boxes"] if b["label"] == name]
        overlap = max((iou(truth, [b["x1"], b["y1"], b["x2"], b["y2"]]) for b in found), default=0.0)
        right += bool(found)
        located += bool(found) and overlap > 0.5
        print(f"{name:5s} truth {box} answer {output.answer[:70]} IoU {overlap:.2f}")
    return right, located


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-images", type=int, default=32)
    args = parser.parse_args()
    began, cpu = time.perf_counter(), time.process_time()
    losses = build_tiny_vlm_prior(args.out, seed=0, steps=args.steps)
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    print(f"training: {args.steps} steps, {wall:.0f} s wall, {cpu:.0f} s CPU ({cpu / args.steps:.2f} s CPU a step)")
    window = max(1, args.steps // 10)
    print("loss by tenth:", [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 3)
                             for i in range(0, args.steps, window)])  # fmt: skip
    right, located = evaluate(args.out, args.eval_images, seed=12345)
    print(f"held-out drawings: class right {right}/{args.eval_images}, IoU > 0.5 {located}/{args.eval_images}")


if __name__ == "__main__":
    main()
