"""The evaluation pass's scoring against the loop a user would write, in one process on this machine.

Naive: for each generated image, embed it and its subject's photos with DINO and CLIP and its prompt with CLIP, one
image at a time (what a notebook over generations.parquet does). dreamfleet (ray_jobs/evaluate.EvaluationScorer):
each subject's photos embedded once and kept, generated images scored in batches of --batch. Both use the same
engine.evaluation.Evaluator and give the same scores (checked). `--models paper` builds random models of the
paper's shapes (DINO ViT-S/16, CLIP ViT-L/14, 224 px) through save_pretrained/from_pretrained; `tiny` the tiny ones.

Run from the repo root:
    .venv/bin/python bench/evaluation_throughput.py [--models tiny|paper] [--subjects 4] [--images 8] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench.timing import timed  # noqa: E402
from engine.evaluation import Evaluator  # noqa: E402


def build_paper_shaped(folder: Path) -> tuple[str, str]:
    """Random DINO ViT-S/16 and CLIP ViT-L/14 (224 px) folders: the real models' cost without their weights."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,  # fmt: skip
        ViTModel,
    )

    from engine.tiny.common import build_clip_tokenizer

    dino, clip = folder / "dino-vits16-shaped", folder / "clip-vitl14-shaped"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       patch_size=16, image_size=224), add_pooling_layer=False).save_pretrained(dino)  # fmt: skip
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(dino)
    tokenizer = build_clip_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "patch_size": 14, "image_size": 224}  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(clip)
    images = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(clip)
    return str(dino), str(clip)


def picture(seed: int, size: int = 512) -> Image.Image:
    image = Image.new("RGB", (size, size), ((seed * 37) % 256, 80, 160))
    ImageDraw.Draw(image).ellipse((60 + seed % 50, 80, 300 + seed % 90, 330), fill=(240, 200, 20))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--photos", type=int, default=4, help="real photos per subject")
    parser.add_argument("--images", type=int, default=8, help="generated images per subject")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as work:
        dino, clip = ("tiny", "tiny") if args.models == "tiny" else build_paper_shaped(Path(work))
        evaluator = Evaluator(dino, clip, "cpu")
        photos = {s: [picture(100 * s + k) for k in range(args.photos)] for s in range(args.subjects)}
        rows = [(s, picture(100 * s + 50 + i), f"a photo of sks thing {i}") for s in photos for i in range(args.images)]
        evaluator.score([rows[0][1]], [rows[0][2]], [evaluator.image_embeddings(photos[0][:1])])  # warm-up

        with timed() as naive:
            expected = [evaluator.score([image], [prompt], [evaluator.image_embeddings(photos[s])])[0]
                        for s, image, prompt in rows]  # fmt: skip
        with timed() as batched:
            references = {s: evaluator.image_embeddings(p) for s, p in photos.items()}
            found = []
            for start in range(0, len(rows), args.batch):
                part = rows[start : start + args.batch]
                found += evaluator.score([r[1] for r in part], [r[2] for r in part], [references[r[0]] for r in part])
    worst = max(abs(getattr(a, k) - getattr(b, k)) for a, b in zip(expected, found) for k in ("dino", "clip_i", "clip_t"))

    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"models {args.models}; {args.subjects} subjects x {args.photos} photos, {len(rows)} generated 512 px images; "
          f"batch {args.batch}; {args.threads} torch threads; largest score difference {worst:.1e}\n")  # fmt: skip
    print("| scoring | wall s | images/s |")
    print("| --- | --- | --- |")
    for name, timing in (("naive: one image at a time, photos re-embedded", naive.timing),
                         ("dreamfleet: photos once per subject, batched", batched.timing)):  # fmt: skip
        print(f"| {name} | {timing.wall_s:.2f} | {len(rows) / timing.wall_s:.1f} |")
    print(f"\nspeed-up {naive.timing.wall_s / batched.timing.wall_s:.1f}x")


if __name__ == "__main__":
    main()
