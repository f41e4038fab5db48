"""Subject photos drawn in code and the manifest rows that name them."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def draw_subject(path: Path, shift: int = 0, size: tuple[int, int] = (48, 40)) -> Path:
    """A yellow ball on blue: a simple, recognisable subject."""
    image = Image.new("RGB", size, (30, 60, 200))
    ImageDraw.Draw(image).ellipse((8 + shift, 6, 38 + shift, 34), fill=(240, 200, 20))
    image.save(path)
    return path


def make_subject_rows(folder: Path, n: int, classes=("ball", "box"), prefix: str = "s") -> list[dict]:
    rows = []
    for i in range(n):
        images = folder / f"{prefix}{i}"
        images.mkdir(parents=True, exist_ok=True)
        uris = [str(draw_subject(images / f"{k}.png", shift=i + k)) for k in range(3)]
        cls = classes[i % len(classes)]
        rows.append(
            {
                "subject_id": f"{prefix}{i}",
                "instance_images": uris,
                "instance_prompt": f"a photo of sks {cls}",
                "class_prompt": f"a photo of a {cls}",
            }
        )
    return rows
