"""The benchmarks' subject, a yellow ball on blue drawn with PIL as tests/conftest.py draws it, and its prompts."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

PROMPT, CLASS_PROMPT = "a photo of sks ball", "a photo of a ball"


def draw_subject(folder: Path, count: int = 4, size: tuple[int, int] = (48, 40), ball=(240, 200, 20),
                 background=(30, 60, 200)) -> list[str]:  # fmt: skip
    """`count` PNGs of the ball, each shifted one more pixel (per 48 px of width) to the right; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    scale = size[0] / 48
    paths = []
    for i in range(count):
        image = Image.new("RGB", size, background)
        box = ((8 + i) * scale, 6 * scale, (38 + i) * scale, 34 * scale)
        ImageDraw.Draw(image).ellipse(box, fill=ball)
        path = folder / f"ball-{i}.png"
        image.save(path)
        paths.append(str(path))
    return paths
