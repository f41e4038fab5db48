"""`dreamfleet analyze`: a Ray Data pass of a vision-language model over an images manifest.

read Parquet → decode and fit to the pixel budget (CPU tasks) → the model (long-lived actors, `num_gpus` each)
→ rows streamed back and committed as part files → one OUTPUT.parquet. Every input row comes out once: a row
whose image is bad gets an `error` and every other row is processed. A rerun skips the ids already written.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from engine import storage
from engine.images import ImageError, decode_image, read_image
from engine.settings import Settings
from ray_jobs import exit_status
from ray_jobs.manifest import ManifestError

STANDARD_COLUMNS = pa.schema(
    [("error", pa.string()), ("model", pa.string()), ("num_output_tokens", pa.int32()), ("reasoning", pa.string())]
)
INTERNAL = ("__pixels", "__width", "__height", "__decode_error")  # decoded images, dropped before output
TIMING = ("__batch", "__batch_seconds")  # which model call made a row and how long it took, read by the driver


@dataclass
class AnalyzeRequest:
    input: str
    task: str
    out: str
    settings: Settings
    vlm_model: str = "tiny"
    schema_file: str | None = None
    policy_file: str | None = None
    address: str | None = None


def parts_dir(out: str) -> str:
    return f"{out.rstrip('/')}.parts"


# -- the manifest ----------------------------------------------------------------------------------------------


def check_images_manifest(uri: str) -> tuple[pa.Schema, list[str]]:
    """File-level checks before anything runs: readable Parquet, an `id` column of unique values, an image column."""
    fs, path = storage.filesystem(uri)
    try:
        parquet = pq.ParquetFile(fs.open(path, "rb"))
    except FileNotFoundError:
        raise ManifestError(f"{uri}: no such file") from None
    except Exception as err:
        raise ManifestError(f"{uri}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    schema = parquet.schema_arrow
    if "id" not in schema.names:
        raise ManifestError(f"{uri}: no 'id' column")
    if not {"image", "image_bytes"} & set(schema.names):
        raise ManifestError(f"{uri}: needs an 'image' (URI) or 'image_bytes' column")
    for name, kinds in (("id", (pa.types.is_string, pa.types.is_large_string)),
                        ("image", (pa.types.is_string, pa.types.is_large_string)),
                        ("image_bytes", (pa.types.is_binary, pa.types.is_large_binary))):  # fmt: skip
        if name in schema.names and not any(k(schema.field(name).type) for k in kinds):
            raise ManifestError(f"{uri}: column '{name}' has type {schema.field(name).type}")
    text = parquet.read(columns=[c for c in ("id", "image") if c in schema.names])
    for name in text.column_names:  # the pass decodes these as text; bytes that are not UTF-8 would stop it midway
        try:
            text.column(name).validate(full=True)
        except pa.ArrowInvalid:
            raise ManifestError(f"{uri}: column '{name}' holds text that is not valid UTF-8") from None
    ids = text.column("id")
    if ids.null_count:
        raise ManifestError(f"{uri}: {ids.null_count} row(s) have no id")
    counts = pc.value_counts(ids)
    repeated = [v["values"].as_py() for v in counts if v["counts"].as_py() > 1]
    if repeated:
        raise ManifestError(f"{uri}: duplicate ids, e.g. {repeated[:5]}")
    return schema, ids.to_pylist()


def check_image_rows(uri: str, settings: Settings) -> list[tuple[int, str, str]]:
    """Every row that a pass would answer with an error, as (row, id, reason): what `validate --kind images` prints."""
    schema, _ = check_images_manifest(uri)
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=[c for c in ("id", "image", "image_bytes") if c in schema.names])
    problems = []
    for row, data in enumerate(table.to_pylist()):
        try:
            _load_row(data.get("image"), data.get("image_bytes"), settings)
        except ImageError as err:
            problems.append((row, data["id"], str(err)))
    return problems


def written_ids(out: str) -> set[str]:
    """Ids already in OUTPUT.parquet or in committed part files of an interrupted pass."""
    files = [out] if storage.exists(out) else []
    files += [storage.join(parts_dir(out), n) for n in storage.listdir(parts_dir(out)) if n.endswith(".parquet")]
    ids: set[str] = set()
    for uri in files:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return ids


# -- CPU stage: decode ------------------------------------------------------------------------------------------


def fit_pixel_budget(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Scale so width × height lies within [min_pixels, max_pixels], keeping the aspect ratio."""
    area = image.width * image.height
    scale = (max_pixels / area) ** 0.5 if area > max_pixels else (min_pixels / area) ** 0.5 if area < min_pixels else 1
    if scale == 1:
        return image
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _load_row(uri: str | None, data: bytes | None, settings: Settings) -> Image.Image:
    if (uri is None) == (data is None):
        raise ImageError("the row has neither 'image' nor 'image_bytes'" if uri is None else
                         "the row has both 'image' and 'image_bytes'; give one")  # fmt: skip
    limits = {"max_pixels": settings.max_image_pixels, "min_side": settings.min_image_side}
    if data is not None:
        return decode_image(data, name="image_bytes", **limits)
    return read_image(uri, **limits)


def decode_batch(batch: pa.Table, settings: Settings, skip_ids: frozenset[str]) -> pa.Table:
    """Drop already-written rows, then decode each image into raw RGB at the pixel budget (or record why not)."""
    if skip_ids:
        batch = batch.filter(pc.invert(pc.is_in(batch.column("id"), pa.array(list(skip_ids), pa.string()))))
    uris = batch.column("image").to_pylist() if "image" in batch.column_names else [None] * batch.num_rows
    blobs = batch.column("image_bytes").to_pylist() if "image_bytes" in batch.column_names else [None] * batch.num_rows
    pixels, widths, heights, errors = [], [], [], []
    for uri, data in zip(uris, blobs):
        try:
            image = fit_pixel_budget(_load_row(uri, data, settings), settings.vlm_min_pixels, settings.vlm_max_pixels)
            pixels.append(image.tobytes())
            widths.append(image.width)
            heights.append(image.height)
            errors.append(None)
        except ImageError as err:
            pixels.append(None)
            widths.append(None)
            heights.append(None)
            errors.append(str(err))
    for name, values, kind in zip(INTERNAL, (pixels, widths, heights, errors),
                                  (pa.binary(), pa.int32(), pa.int32(), pa.string())):  # fmt: skip
        batch = batch.append_column(name, pa.array(values, kind))
    return batch


# -- model stage ------------------------------------------------------------------------------------------------


def output_schema(input_schema: pa.Schema, task) -> pa.Schema:
    fields = [f for f in input_schema if f.name not in INTERNAL + TIMING]
    taken = {f.name for f in fields}
    clashes = sorted(taken & (set(STANDARD_COLUMNS.names) | set(task.columns.names)))
    if clashes:
        raise ManifestError(f"input columns {clashes} clash with the pass's output columns")
    return pa.schema([*fields, *STANDARD_COLUMNS, *task.columns])


class VLMPredictor:
    """A model actor: loads the VLM once, then answers batches of decoded images."""

    def __init__(self, vlm_model: str, settings: Settings, task_args: dict[str, Any]):
        from engine.constrained import GrammarCompiler
        from engine.vlm import VLM
        from engine.vlm_tasks import make_task

        self.vlm = VLM(vlm_model, settings)
        self.task = make_task(settings=settings, **task_args)
        self.task.prepare(self.vlm)
        self.answer_processor = None
        if self.task.grammar is not None:
            compiler = GrammarCompiler(self.vlm.processor.tokenizer, self.vlm.vocab_size)
            self.answer_processor = compiler.processor_factory(self.task.grammar)

    def __call__(self, batch: pa.Table) -> pa.Table:
        began = time.perf_counter()
        schema = output_schema(batch.schema, self.task)
        rows = [{name: None for name in (*STANDARD_COLUMNS.names, *self.task.columns.names)} for _ in range(batch.num_rows)]
        errors = batch.column("__decode_error").to_pylist()
        good = [i for i, e in enumerate(errors) if e is None]
        for i, error in enumerate(errors):
            rows[i].update(error=error, model=self.vlm.name)
        if good:
            self._answer(batch, good, rows)
        columns = {f.name: batch.column(f.name) for f in batch.schema if f.name not in INTERNAL}
        for field in (*STANDARD_COLUMNS, *self.task.columns):
            columns[field.name] = pa.array([r[field.name] for r in rows], field.type)
        table = pa.table(columns, schema=schema)
        table = table.append_column(TIMING[0], pa.array([uuid.uuid4().hex] * table.num_rows, pa.string()))
        return table.append_column(TIMING[1], pa.array([time.perf_counter() - began] * table.num_rows, pa.float64()))

    def _answer(self, batch: pa.Table, good: list[int], rows: list[dict]) -> None:
        pixels, widths, heights = (batch.column(c).to_pylist() for c in INTERNAL[:3])
        images = [
            Image.fromarray(np.frombuffer(pixels[i], np.uint8).reshape(heights[i], widths[i], 3)) for i in good
        ]
        try:
            outputs = self.vlm.generate(images, self.task.instruction, self.answer_processor,
                                        self.task.wants_first_logits)  # fmt: skip
        except Exception as err:  # the whole batch failed (e.g. out of memory): each row says so, none is lost
            for i in good:
                rows[i]["error"] = f"model: {type(err).__name__}: {err}"
            return
        for i, output in zip(good, outputs):
            rows[i].update(num_output_tokens=output.num_output_tokens, reasoning=output.reasoning)
            try:
                rows[i].update(self.task.parse(output))
            except ValueError as err:
                rows[i]["error"] = f"answer: {err}"


# -- the pass ---------------------------------------------------------------------------------------------------


def commit_output(out: str, schema: pa.Schema) -> tuple[int, int]:
    """Merge OUTPUT.parquet and the part files into a new OUTPUT.parquet, streamed, published atomically.
    Returns (rows, rows with an error)."""
    sources = [out] if storage.exists(out) else []
    sources += [storage.join(parts_dir(out), n) for n in storage.listdir(parts_dir(out)) if n.endswith(".parquet")]
    rows = errors = 0
    with tempfile.TemporaryDirectory(prefix="dreamfleet-out-") as tmp:
        local = Path(tmp) / "out.parquet"
        with pq.ParquetWriter(local, schema) as writer:
            for uri in sources:
                fs, path = storage.filesystem(uri)
                with fs.open(path, "rb") as f:
                    for record_batch in pq.ParquetFile(f).iter_batches():
                        table = pa.Table.from_batches([record_batch]).select(schema.names)
                        writer.write_table(table.cast(schema))
                        rows += record_batch.num_rows
                        errors += record_batch.num_rows - record_batch.column("error").null_count
        storage.put_file(local, out)
    storage.remove(parts_dir(out))
    return rows, errors


def _spread() -> dict[str, str]:
    return {"scheduling_strategy": "SPREAD"}


def analyze(request: AnalyzeRequest, metrics=None) -> int:
    """Run the pass; returns the exit status (0 all rows answered, 1 some rows have errors)."""
    import ray

    from engine.vlm_tasks import make_task
    from ray_jobs.fleet import connect

    input_schema, ids = check_images_manifest(request.input)
    task_args = {"name": request.task, "schema_file": request.schema_file, "policy_file": request.policy_file}
    task = make_task(settings=request.settings, **task_args)  # bad schema or policy files fail here, before Ray
    schema = output_schema(input_schema, task)
    done = frozenset(written_ids(request.out))
    if set(ids) <= done:  # nothing left (or an empty manifest): no cluster needed
        return _finish(request, schema)
    connect(request.address)
    # A live bar on a terminal; in logs (CI, ray job submit) Ray Data would print its progress every few seconds.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    fs, path = storage.filesystem(request.input)
    settings = request.settings
    ds = ray.data.read_parquet(path, filesystem=fs)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"settings": settings, "skip_ids": done},
        batch_format="pyarrow",
        # SPREAD puts decoding on every node's CPUs. Given as a function, it also keeps Ray Data from fusing
        # decoding into the model actors (it never fuses ops whose args are known only at run time), so the
        # GPU never waits on a JPEG.
        ray_remote_args_fn=_spread,
    )
    gpus = settings.vlm_gpus_per_actor if ray.cluster_resources().get("GPU", 0) > 0 else 0
    ds = ds.map_batches(
        VLMPredictor,
        fn_constructor_kwargs={"vlm_model": request.vlm_model, "settings": settings, "task_args": task_args},
        batch_size=settings.vlm_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=settings.vlm_concurrency),
        num_gpus=gpus,
    )
    seen_calls: set[str] = set()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if not batch.num_rows:
            continue
        if metrics is not None:
            _observe(metrics, request.task, batch, seen_calls)
        batch = batch.select(schema.names).cast(schema)
        # Each committed part survives a crash: a rerun skips its ids and the final merge keeps its rows.
        storage.write_parquet(storage.join(parts_dir(request.out), f"part-{uuid.uuid4().hex}.parquet"), batch)
    return _finish(request, schema)


def _observe(metrics, task: str, batch: pa.Table, seen_calls: set[str]) -> None:
    """Per model call: rows by outcome, output tokens, and its duration (once, even if its rows arrive split)."""
    for call in pc.unique(batch.column(TIMING[0])).to_pylist():
        rows = batch.filter(pc.equal(batch.column(TIMING[0]), call))
        errors = rows.num_rows - rows.column("error").null_count
        tokens = pc.sum(rows.column("num_output_tokens")).as_py() or 0
        seconds = None if call in seen_calls else rows.column(TIMING[1])[0].as_py()
        seen_calls.add(call)
        metrics.on_vlm_batch(task, rows.num_rows, errors, tokens, seconds)


def _finish(request: AnalyzeRequest, schema: pa.Schema) -> int:
    rows, errors = commit_output(request.out, schema)
    print(json.dumps({"output": request.out, "task": request.task, "rows": rows, "rows_with_errors": errors}))
    return exit_status.OK if errors == 0 else exit_status.SOME_FAILED
