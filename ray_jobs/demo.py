"""`dreamfleet demo`: the whole product on the embedded default (local Ray, tiny models, CPU) in a few minutes:
synthetic subjects through train → generate → moderate → evaluate, and rendered receipts through OCR and extraction.
Everything it uses is drawn here; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from engine.settings import load_settings
from ray_jobs.passes.analyze import AnalyzeRequest, analyze
from ray_jobs.report.run_report import write_run_report
from ray_jobs.run import FleetRequest, run_manifest
from ray_jobs.state.manifest import write_subjects_manifest

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
                # the bare class prompt too: its images measure PRES (did the subject take the class over?)
                "prompts": [f"a photo of sks {noun} on a table", f"a photo of sks {noun} in the snow",
                            f"a photo of a {noun}"],
            }
        )
    manifest = str((folder / "subjects.parquet").resolve())
    write_subjects_manifest(manifest, rows)
    return manifest


# Receipts with known fields: what OCR should read and extraction should find on each.
DOCUMENTS = [
    {"id": "receipt-001", "vendor": "Acme Coffee", "date": "2026-01-14", "total": 12.5},
    {"id": "receipt-002", "vendor": "Blue Bakery", "date": "2026-02-03", "total": 7.25},
    {"id": "invoice-003", "vendor": "Nordic Tools", "date": "2026-03-21", "total": 149.0},
]
RECEIPT_SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},  # unbounded: the decoder gives it what the token budget leaves
        "date": {"type": "string", "format": "date"},
        "total": {"type": "number"},
    },
    "required": ["vendor", "date", "total"],
}


def make_documents(folder: Path) -> tuple[str, str]:
    """Rendered receipts as an images manifest (with their true fields as extra columns), and the schema file."""
    rows = []
    for doc in DOCUMENTS:
        image = Image.new("RGB", (240, 160), "white")
        pen = ImageDraw.Draw(image)
        lines = [doc["vendor"].upper(), f"Date: {doc['date']}", "Item 1 ........ 1", f"TOTAL  {doc['total']:.2f} EUR"]
        for i, line in enumerate(lines):
            pen.text((12, 14 + 32 * i), line, fill="black")
        path = folder / "documents" / f"{doc['id']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        rows.append({"id": doc["id"], "image": str(path.resolve()), "true_vendor": doc["vendor"],
                     "true_date": doc["date"], "true_total": doc["total"]})  # fmt: skip
    manifest = str((folder / "documents.parquet").resolve())
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    schema = folder / "receipt.schema.json"
    schema.write_text(json.dumps(RECEIPT_SCHEMA, indent=2))
    return manifest, str(schema)


def run_demo(out: str, verbose: bool = False) -> int:
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
        verbose=verbose,
    )
    code, run = run_manifest(request, ("train", "generate", "moderate", "evaluate"))
    print(f"run directory: {run.uri}")
    print(f"generated images: {run.uri}/generations.parquet; moderation: {run.uri}/moderation.parquet; "
          f"DINO / CLIP-I / CLIP-T: {run.uri}/evaluation.parquet")

    documents, schema = make_documents(folder)
    print(f"demo: {len(DOCUMENTS)} rendered receipts → OCR and field extraction ({documents})")
    for task in ("ocr", "extract"):
        result = str((folder / f"documents-{task}.parquet").resolve())
        analysis = AnalyzeRequest(input=documents, task=task, out=result, settings=request.settings,
                                  schema_file=schema if task == "extract" else None, verbose=verbose)  # fmt: skip
        code = max(code, analyze(analysis))
    print(f"report: {write_run_report(run.uri)}")
    print("the tiny models are random: the pipeline is real, the words are noise. Use --vlm-model and "
          "--base-model with real weights for real answers.")
    return code
