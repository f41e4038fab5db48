"""What reports are made of, built by hand: a finished run directory of three subjects (build_run), VLM pass
outputs (pass_output), and the images they show, a two-page PDF among them."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from engine import storage
from engine.settings import load_settings
from ray_jobs.state.generations import SCHEMA as GENERATIONS_SCHEMA
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory, SubjectStatus

SCRIPT = "<script>alert(1)</script>"
# Would change the page if it ever reached the DOM as markup (and scripts ran); the report must show it as text.
INJECTED = "<img src=x onerror=\"document.title='pwned'\">"
SCRIPT_PROMPT = f"a photo of sks ball {SCRIPT}"
FAILURE = "<b>CUDA</b> out of memory after 3 attempts"
PACK = "node1-42-1"  # a pack id as the worker makes them: node, pid, the worker's nth pack
MODERATION_COLUMNS = [("error", pa.string()), ("model", pa.string()), ("num_output_tokens", pa.int32()),
                      ("reasoning", pa.string()), ("safe", pa.bool_()), ("categories", pa.list_(pa.string())),
                      ("score", pa.float64())]  # fmt: skip
BOX = pa.struct([("label", pa.string()), ("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.float64()),
                 ("y2", pa.float64())])  # fmt: skip
VLM_COLUMNS = [("id", pa.string()), ("image", pa.string()), ("image_bytes", pa.binary()), ("video", pa.string()),
               *MODERATION_COLUMNS[:4], ("page", pa.int32())]  # fmt: skip
YELLOW, CYAN, GREY = (255, 230, 0), (0, 220, 255), (128, 128, 128)


# -- a run directory -------------------------------------------------------------------------------------------------


def png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64), shift: int = 0) -> bytes:
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).ellipse((8 + shift, 8, 40 + shift, 40), fill=(240, 200, 20))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def build_run(base: str) -> dict:
    """A finished run of three subjects: alpha (two prompts, one with a script in it), beta, and gamma (failed)."""
    run_uri = storage.join(base, "run")
    settings = load_settings("tiny")
    instance = {}
    for n, sid in enumerate(("alpha", "beta", "gamma")):
        instance[sid] = [storage.join(base, "photos", f"{sid}-{i}.png") for i in range(3)]
        for i, uri in enumerate(instance[sid]):
            storage.write_bytes(uri, png((30 + 80 * n, 60, 200), shift=i))
    manifest = storage.join(base, "subjects.parquet")
    write_subjects_manifest(manifest, [
        {"subject_id": "alpha", "instance_images": instance["alpha"], "instance_prompt": "a photo of sks ball",
         "class_prompt": "a photo of a ball", "prompts": ["a photo of sks ball on a table", SCRIPT_PROMPT]},
        {"subject_id": "beta", "instance_images": instance["beta"], "instance_prompt": "a photo of sks cup",
         "class_prompt": "a photo of a cup", "prompts": ["a photo of sks cup"]},
        {"subject_id": "gamma", "instance_images": instance["gamma"], "instance_prompt": "a photo of sks hat",
         "class_prompt": "a photo of a hat", "prompts": ["a photo of sks hat"]},
    ])  # fmt: skip
    run = RunDirectory(run_uri)
    fingerprint = hashlib.sha256(storage.read_bytes(manifest)).hexdigest()
    run.start(command="run", manifest_uri=manifest, manifest_fingerprint=fingerprint, settings=settings,
              base_model="tiny", base_model_path="/cache/tiny", extend=False)  # fmt: skip
    prompts = {"alpha": ["a photo of sks ball on a table", SCRIPT_PROMPT], "beta": ["a photo of sks cup"]}
    rows = []
    # alpha trained and rendered first time, in a pack with beta; beta's worker died in that pack, the driver was
    # killed during its second attempt (no outcome recorded), and its third trained it alone.
    run.write_status(SubjectStatus("alpha", "done", 2, history=[
        {"attempt": 1, "stage": "train", "ok": True, "steps_run": 20, "seconds": 3.5, "pack": PACK,
         "pack_mates": ["beta"]},
        {"attempt": 2, "stage": "generate", "ok": True, "images_generated": 2, "seconds": 1.0},
    ]))  # fmt: skip
    run.write_status(SubjectStatus("beta", "done", 4, history=[
        {"attempt": 1, "stage": "train", "ok": False, "error": "worker process died: ActorDiedError", "pack": PACK,
         "pack_mates": ["alpha"]},
        {"attempt": 3, "stage": "train", "ok": True, "steps_run": 10, "resumed_from": 10, "seconds": 2.0,
         "pack": "node2-77-1", "pack_mates": []},
        {"attempt": 4, "stage": "generate", "ok": True, "images_generated": 1, "seconds": 1.0},
    ]))  # fmt: skip
    for sid, subject_prompts in prompts.items():
        log = [{"step": s, "loss": 1.0 / s + 0.1, "instance_loss": 0.5, "prior_loss": 0.5, "lr": 1e-4, "seconds": 0.1}
               for s in range(1, 21)]  # fmt: skip
        storage.write_bytes(storage.join(run_uri, "subjects", sid, "train_log.jsonl"),
                            "".join(json.dumps(r) + "\n" for r in log).encode())  # fmt: skip
        for p, prompt in enumerate(subject_prompts):
            for i in range(2 if sid == "alpha" else 1):
                image = storage.join(run_uri, "subjects", sid, "images", f"p{p:04d}-i{i:04d}.png")
                storage.write_bytes(image, png((200, 40 * p, 40 * i), size=(96, 96)))
                rows.append({"id": f"{sid}/p{p:04d}-i{i:04d}", "subject_id": sid, "prompt": prompt, "prompt_index": p,
                             "image_index": i, "seed": 1000 * p + i, "image": image, "guidance_scale": 7.5,
                             "num_inference_steps": 10, "scheduler": "ddim"})  # fmt: skip
    run.write_status(SubjectStatus("gamma", "failed", 3, FAILURE, history=[
        {"attempt": a, "stage": "train", "ok": False, "error": FAILURE} for a in (1, 2, 3)]))  # fmt: skip
    run.write_rejected_rows([{"row": 3, "subject_id": "bad id", "reason": "invalid subject_id 'bad id'"}])
    write_parquet(storage.join(run_uri, "generations.parquet"), pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA))
    verdicts = [(False, ["S1", "S10"], 0.91, None), (True, [], 0.02, None), (True, [], 0.05, None),
                (None, None, None, "image decode failed"), (True, [], 0.01, None)]  # fmt: skip
    moderation = [{**row, "error": error, "model": "tiny", "num_output_tokens": 6, "reasoning": None, "safe": safe,
                   "categories": categories, "score": score}
                  for row, (safe, categories, score, error) in zip(rows, verdicts)]  # fmt: skip
    schema = pa.schema([*GENERATIONS_SCHEMA, *MODERATION_COLUMNS])
    table = pa.Table.from_pylist(moderation, schema=schema)
    for k in range(2):  # a pass output: a folder of part files
        write_parquet(storage.join(run_uri, "moderation.parquet", f"part-{k}.parquet"), table.slice(3 * k, 3))
    run.finish({"done": 2, "failed": 1})
    return {"run": run_uri, "generations": rows, "instance": instance}


def write_parquet(uri: str, table: pa.Table) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue().to_pybytes())


# -- a VLM pass output -----------------------------------------------------------------------------------------------


def pass_output(path: Path, rows: list[dict], task_columns: list[tuple[str, pa.DataType]]) -> Path:
    """A pass output folder of two part files, in the SPEC's shapes: every input column, the standard ones, page."""
    schema = pa.schema([*VLM_COLUMNS, *task_columns])
    table = pa.Table.from_pylist([{"model": "tiny", "num_output_tokens": 5, **r} for r in rows], schema=schema)
    path.mkdir()
    half = (table.num_rows + 1) // 2
    pq.write_table(table.slice(0, half), path / "part-0.parquet")
    pq.write_table(table.slice(half), path / "part-1.parquet")
    return path


def two_page_pdf(path: Path) -> Path:
    """Page 1: 300 x 200 pt, red. Page 2: 200 x 400 pt, blue with a yellow patch at (50, 100)-(150, 200) pt."""
    first = Image.new("RGB", (300, 200), (220, 30, 30))
    second = Image.new("RGB", (200, 400), (30, 30, 220))
    ImageDraw.Draw(second).rectangle((50, 100, 150, 200), fill=YELLOW)
    first.save(path, "PDF", save_all=True, append_images=[second], resolution=72)  # 1 px = 1 pt
    return path
