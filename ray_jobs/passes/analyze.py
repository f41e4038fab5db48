"""`dreamfleet analyze`: a Ray Data pass of a vision-language model over an images manifest.

read Parquet (a file, folder, glob or Hive partitions) → decode and fit to the pixel budget (CPU tasks) → the model
(long-lived actors, `num_gpus` each) → Parquet part files written by Ray Data's write tasks into OUT. No output row
passes through the driver. Every input row comes out once: a row whose image is bad gets an `error` and every
other row is processed. Resume and exactly-once come from Ray Data's checkpointing (see pass_output.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from engine.media.images import ImageError
from engine.media.video import Video
from engine.settings import Settings
from engine.vlm.tasks.base import RowRequest
from ray_jobs import exit_status
from ray_jobs.cluster import connect
from ray_jobs.passes.inputs import (
    VISUAL_COLUMNS,
    ImagesInput,
    RowVisual,
    check_images_manifest,
    row_visuals,
)
from ray_jobs.passes.output import DONE_PAGES, PassOutput, arrow_filesystem
from ray_jobs.passes.resources import model_actor_resources
from ray_jobs.passes.stats import BatchFigures, StatsRelay, send_batch_figures
from ray_jobs.progress import FleetProgress
from ray_jobs.state.manifest import ManifestError

STANDARD_COLUMNS = pa.schema(
    [("error", pa.string()), ("model", pa.string()), ("num_output_tokens", pa.int32()), ("reasoning", pa.string())]
)
PAGE = pa.field("page", pa.int32())  # 1-based page of a PDF row, null for other rows: added by decoding
# What decoding hands the model stage, dropped before output: pixels at the budget (a video's frames one after
# another), their shape, the upright source size boxes are reported in, a video's sampling, or why the row failed.
INTERNAL = pa.schema([
    ("__pixels", pa.binary()), ("__frames", pa.int32()), ("__width", pa.int32()), ("__height", pa.int32()),
    ("__source_width", pa.int32()), ("__source_height", pa.int32()), ("__fps", pa.float64()),
    ("__frame_indices", pa.list_(pa.int32())), ("__decode_error", pa.string()),
])  # fmt: skip


@dataclass
class AnalyzeRequest:
    input: str
    task: str
    out: str
    settings: Settings
    vlm_model: str = "tiny"
    schema_file: str | None = None
    policy_file: str | None = None
    question: str | None = None
    categories: str | None = None
    address: str | None = None
    verbose: bool = False
    show_progress: bool = True

    def task_args(self) -> dict[str, Any]:
        return {"name": self.task, "schema_file": self.schema_file, "policy_file": self.policy_file,
                "question": self.question, "categories": self.categories}  # fmt: skip


# -- CPU stage: decode ------------------------------------------------------------------------------------------


def fit_pixel_budget(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Scale so width × height lies within [min_pixels, max_pixels], keeping the aspect ratio."""
    area = image.width * image.height
    scale = (max_pixels / area) ** 0.5 if area > max_pixels else (min_pixels / area) ** 0.5 if area < min_pixels else 1
    if scale == 1:
        return image
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _values(batch: pa.Table, name: str) -> list:
    """A column's values, or nulls where the input has no such column (e.g. no `question` in an OCR manifest)."""
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def _decoded(shown: RowVisual, settings: Settings) -> dict[str, Any]:
    """The internal columns of one image, page or video at the pixel budget."""
    values: dict[str, Any] = {"__source_width": shown.width, "__source_height": shown.height, "page": shown.page}
    if isinstance(shown.visual, Video):
        clip = shown.visual  # sampled within video_max_pixels already
        return values | {"__pixels": clip.frames.tobytes(), "__frames": len(clip.frame_indices),
                         "__width": clip.width, "__height": clip.height, "__fps": clip.fps,
                         "__frame_indices": clip.frame_indices}  # fmt: skip
    image = fit_pixel_budget(shown.visual, settings.vlm_min_pixels, settings.vlm_max_pixels)
    return values | {"__pixels": image.tobytes(), "__frames": 0, "__width": image.width, "__height": image.height}


def _row_outputs(uri: str | None, data: bytes | None, video: str | None, done_pages: list[int] | None,
                 settings: Settings) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The output rows of one input row: one per image, page or video; a row that fails ends with one error row
    (page null, so a rerun counts the row as done)."""
    try:
        for shown in row_visuals(uri, data, video, settings, done_pages or ()):
            yield _decoded(shown, settings)
    except ImageError as err:
        yield {"page": None, "__decode_error": str(err)}


def decode_batches(batch: pa.Table, settings: Settings) -> Iterator[pa.Table]:
    """Decode each row's image, PDF pages or video frames at the pixel budget, or record why it cannot be used.
    A PDF becomes a row per page: tables are yielded every `vlm_batch_size` output rows, so a long PDF never sits
    in memory whole. `__done_pages` (added by the checkpoint filter on a resumed pass) names pages already written."""
    uris, blobs, videos, done = (_values(batch, c) for c in (*VISUAL_COLUMNS, DONE_PAGES))
    sources: list[int] = []
    rows: list[dict[str, Any]] = []
    for i in range(batch.num_rows):
        for row in _row_outputs(uris[i], blobs[i], videos[i], done[i], settings):
            sources.append(i)
            rows.append(row)
            if len(rows) == settings.vlm_batch_size:
                yield _with_decoded(batch, sources, rows)
                sources, rows = [], []
    if rows:
        yield _with_decoded(batch, sources, rows)


def _with_decoded(batch: pa.Table, sources: list[int], rows: list[dict[str, Any]]) -> pa.Table:
    table = batch.take(pa.array(sources, pa.int64()))
    if DONE_PAGES in table.column_names:
        table = table.drop_columns([DONE_PAGES])
    for field in (PAGE, *INTERNAL):
        table = table.append_column(field, pa.array([r.get(field.name) for r in rows], field.type))
    return table


def decode_memory_bytes(settings: Settings, has_video: bool) -> int:
    """What one decode task holds at most: a batch of decoded images (or videos) at the pixel budget, plus the largest
    source image it may open (RGBA at max_image_pixels)."""
    per_row = max(settings.vlm_max_pixels, settings.video_max_pixels if has_video else 0) * 3
    return settings.vlm_batch_size * per_row + settings.max_image_pixels * 4


# -- model stage ------------------------------------------------------------------------------------------------


def output_schema(input_schema: pa.Schema, task) -> pa.Schema:
    fields = list(input_schema)
    taken = {f.name for f in fields}
    clashes = sorted(taken & ({PAGE.name, *STANDARD_COLUMNS.names, *task.columns.names} | set(INTERNAL.names)))
    if clashes:
        raise ManifestError(f"input columns {clashes} clash with the pass's output columns")
    return pa.schema([*fields, *STANDARD_COLUMNS, PAGE, *task.columns])


class VLMPredictor:
    """A model actor: loads the VLM once, then answers batches of decoded images."""

    def __init__(self, vlm_model: str, settings: Settings, task_args: dict[str, Any], schema: pa.Schema, inbox=None):
        from engine.vlm.constrained import GrammarCompiler
        from engine.vlm.model import VLM
        from engine.vlm.tasks import make_task

        self.vlm = VLM(vlm_model, settings)
        self.task = make_task(settings=settings, **task_args)
        self.task.prepare(self.vlm)
        self.schema, self.inbox = schema, inbox
        self.grammars = GrammarCompiler(self.vlm.processor.tokenizer, self.vlm.vocab_size)  # compiles each once

    def __call__(self, batch: pa.Table) -> pa.Table:
        began = time.perf_counter()
        rows = [{name: None for name in (*STANDARD_COLUMNS.names, *self.task.columns.names)} for _ in range(batch.num_rows)]
        for i, error in enumerate(batch.column("__decode_error").to_pylist()):
            rows[i].update(error=error, model=self.vlm.name)
        asked = self._ask(batch, rows)
        if asked:
            self._answer(batch, asked, rows)
        columns = {f.name: batch.column(f.name).cast(f.type) for f in self.schema if f.name in batch.column_names}
        for field in (*STANDARD_COLUMNS, *self.task.columns):
            columns[field.name] = pa.array([r[field.name] for r in rows], field.type)
        table = pa.table(columns, schema=self.schema)
        self._report(table, time.perf_counter() - began)
        return table

    def _ask(self, batch: pa.Table, rows: list[dict]) -> dict[int, tuple[RowRequest, str]]:
        """Each decoded row's request and instruction; a row the task cannot ask gets its error instead."""
        questions, categories = _values(batch, "question"), _values(batch, "categories")
        widths, heights, frames = (_values(batch, c) for c in ("__source_width", "__source_height", "__frames"))
        asked = {}
        for i, row in enumerate(rows):
            if row["error"] is not None:
                continue
            request = RowRequest(widths[i], heights[i], questions[i], categories[i], is_video=frames[i] > 0)
            if request.is_video and not self.task.accepts_video:
                row["error"] = f"task {self.task.name} does not take video rows (caption, moderate, ocr and vqa do)"
                continue
            try:
                asked[i] = (request, self.task.instruction(request))
            except ValueError as err:
                row["error"] = f"task: {err}"
        return asked

    def _visual(self, batch: pa.Table, i: int) -> Image.Image | Video:
        pixels = np.frombuffer(batch.column("__pixels")[i].as_py(), np.uint8)
        width, height = batch.column("__width")[i].as_py(), batch.column("__height")[i].as_py()
        frames = batch.column("__frames")[i].as_py()
        if frames:
            indices = batch.column("__frame_indices")[i].as_py()
            return Video(pixels.reshape(frames, height, width, 3), batch.column("__fps")[i].as_py(), indices)
        return Image.fromarray(pixels.reshape(height, width, 3))

    def _answer(self, batch: pa.Table, asked: dict[int, tuple[RowRequest, str]], rows: list[dict]) -> None:
        order = list(asked)
        visuals = [self._visual(batch, i) for i in order]
        instructions = [asked[i][1] for i in order]
        grammars = [self.task.grammar(asked[i][0]) for i in order]
        processor = self.grammars.processor_factory(grammars) if grammars[0] is not None else None
        try:
            outputs = self.vlm.generate(visuals, instructions, processor, self.task.wants_first_logits)
        except Exception as err:  # the whole batch failed (e.g. out of memory): each row says so, none is lost
            for i in order:
                rows[i]["error"] = f"model: {type(err).__name__}: {err}"
            return
        for i, output in zip(order, outputs):
            rows[i].update(num_output_tokens=output.num_output_tokens, reasoning=output.reasoning)
            try:
                rows[i].update(self.task.parse(output, asked[i][0]))
            except ValueError as err:
                rows[i]["error"] = f"answer: {err}"

    def _report(self, table: pa.Table, seconds: float) -> None:
        if not table.num_rows:
            return
        errors = table.num_rows - table.column("error").null_count
        tokens = int(sum(t or 0 for t in table.column("num_output_tokens").to_pylist()))
        send_batch_figures(self.inbox, BatchFigures(table.num_rows, errors, seconds, tokens=tokens))


# -- the pass ---------------------------------------------------------------------------------------------------


@contextmanager
def vlm_stats_relay(metrics, task: str, progress: FleetProgress, rows_left: int) -> Iterator[StatsRelay]:
    """The pass's live figures: rows answered and failed into the progress bar, and the VLM series."""

    def on_batch(figures: BatchFigures) -> None:
        progress.add(figures.rows - figures.errors, figures.errors)
        if metrics is not None:
            metrics.on_vlm_batch(task, figures)

    if metrics is not None:
        metrics.on_vlm_pass(task, rows_left)
    with StatsRelay(on_batch) as relay:
        yield relay
    if metrics is not None:
        metrics.on_vlm_pass(task, 0)


def analyze(request: AnalyzeRequest, metrics=None) -> int:
    """Run the pass; returns the exit status (0 all rows answered, 1 some rows have errors)."""
    from engine.vlm.tasks import make_task

    images = check_images_manifest(request.input)
    task_args = request.task_args()
    task = make_task(settings=request.settings, **task_args)  # bad schema or policy files fail here, before Ray
    task.check_input(images.schema.names)
    schema = output_schema(images.schema, task)
    output = PassOutput(request.out)
    output.prepare()
    if not output.holds_every_id(images):  # a finished pass needs no cluster to learn that nothing is left
        _run_pass(request, images, output, task_args, schema, metrics)
    rows, errors = output.summary()
    print(json.dumps({"output": request.out, "task": request.task, "rows": rows, "rows_with_errors": errors}))
    return exit_status.OK if errors == 0 else exit_status.SOME_FAILED


def _run_pass(request: AnalyzeRequest, images: ImagesInput, output: PassOutput, task_args: dict[str, Any],
              schema: pa.Schema, metrics) -> None:  # fmt: skip
    import ray
    from ray.data.datasource.partitioning import Partitioning

    connect(request.address, request.verbose)
    settings = request.settings
    gpus, actor_cpus = model_actor_resources("vlm", settings.vlm_concurrency, settings.vlm_gpus_per_actor,
                                             settings.vlm_cpus_per_actor, output.resuming())  # fmt: skip
    with output.checkpointed(request.verbose):
        ds = ray.data.read_parquet(list(images.files), filesystem=arrow_filesystem(images.filesystem),
                                   partitioning=Partitioning("hive", base_dir=images.base_dir))
        # Ray's reader makes blocks of up to 128 MB: a manifest of URIs can be one block, so one decode task and one
        # commit for the whole pass. Blocks of one file's rows spread decoding over the CPUs and let the writer commit
        # every `vlm_rows_per_file` rows (smaller blocks measured 3.7x slower at 100k rows: a task per block).
        ds = ds.repartition(target_num_rows_per_block=settings.vlm_rows_per_file)
        ds = ds.map_batches(
            decode_batches,
            fn_kwargs={"settings": settings},
            batch_size=settings.vlm_batch_size,
            batch_format="pyarrow",
            # Decoding reserves the memory its batch of images needs. Being a resource the model actors do not ask
            # for, it also keeps Ray Data from fusing decoding into them (it fuses only ops of equal resources),
            # so the GPU never waits on a JPEG.
            memory=decode_memory_bytes(settings, "video" in images.schema.names),
        )
        left = max(0, images.num_rows - output.committed_rows())
        progress = FleetProgress(left, enabled=request.show_progress, label=f"{request.task} rows")
        with progress, vlm_stats_relay(metrics, request.task, progress, left) as relay:
            ds = ds.map_batches(
                VLMPredictor,
                fn_constructor_kwargs={"vlm_model": request.vlm_model, "settings": settings, "task_args": task_args,
                                       "schema": schema, "inbox": relay.inbox},  # fmt: skip
                batch_size=settings.vlm_batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=settings.vlm_concurrency),
                num_gpus=gpus,
                num_cpus=actor_cpus,
            )
            output.write(ds, settings.vlm_rows_per_file)
