"""`dreamfleet demo`: a small synthetic manifest through the whole fleet on the embedded default (local Ray, tiny
models, CPU), in a few minutes. Everything it makes is drawn here; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from engine.settings import load_settings
from ray_jobs.fleet import FleetRequest, run_manifest
from ray_jobs.manifest import write_subjects_manifest

# (subject id, class noun, shape, colour, background)
SUBJECTS = [
    ("ball-red", "ball", "ellipse", (220, 40, 40), (30, 60, 200)),
    ("ball-gold", "ball", "ellipse", (240, 200, 20), (20, 120, 60)),
    ("box-teal", "box", "rectangle", (20, 180, 170), (240, 230, 210)),
    ("box-violet", "box", "rectangle", (140, 60, 200), (250, 250, 250)),
]


def draw(shape: str, colour, background, shift: int, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    box = (12 + shift, 14 - shift // 2, 48 + shift, 50 - shift // 2)
    getattr(ImageDraw.Draw(image), shape)(box, fill=colour)
    return image


def make_subjects_manifest(folder: Path) -> str:
    rows = []
    for sid, noun, shape, colour, background in SUBJECTS:
        images = []
        for k in range(4):
            path = folder / "images" / sid / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw(shape, colour, background, shift=2 * k).save(path)
            images.append(str(path.resolve()))
        rows.append(
            {
                "subject_id": sid,
                "instance_images": images,
                "instance_prompt": f"a photo of sks {noun}",
                "class_prompt": f"a photo of a {noun}",
                "prompts": [f"a photo of sks {noun} on a table", f"a photo of sks {noun} in the snow"],
            }
        )
    manifest = str((folder / "subjects.parquet").resolve())
    write_subjects_manifest(manifest, rows)
    return manifest


def run_demo(out: str) -> int:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = make_subjects_manifest(folder)
    print(f"demo: {len(SUBJECTS)} synthetic subjects, 2 class prompts → {manifest}")
    request = FleetRequest(
        manifest=manifest,
        out=str((folder / "run").resolve()),
        settings=load_settings("tiny"),
        base_model="tiny",
        workers=2,
        command="demo",
    )
    code, run = run_manifest(request, ("train", "generate"))
    print(f"run directory: {run.uri}")
    print(f"generated images: {run.uri}/generations.parquet")
    return code
