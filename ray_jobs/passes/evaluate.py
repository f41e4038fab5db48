"""`dreamfleet evaluate RUN`, also the last stage of `dreamfleet run`: DINO, CLIP-I and CLIP-T of every generated image
(engine/evaluation.py says what each measures).

RUN/generations.parquet → Ray Data: read → scoring actors (each loads both evaluation models once, embeds each
subject's real photos once, then scores batches of generated images) → RUN/evaluation.parquet, part files written
by Ray Data's write tasks, so no row passes through the driver. Checkpointed by id as VLM passes are
(pass_output.py): a rerun scores only the images not written yet, e.g. those of subjects added with --extend.
Then the driver reads back the score columns alone, writes each subject's means into its status.json, and the
report shows them.

A Ray Data pass rather than the fleet's workers: by the time images exist the fleet has ended, and `evaluate` on
its own must not need one; the pass streams with bounded memory and gets exactly-once from Ray Data.
"""

from __future__ import annotations

import json
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from PIL import Image

from engine import storage
from engine.media.images import ImageError, read_image
from engine.settings import Settings
from ray_jobs import exit_status
from ray_jobs.cluster import connect
from ray_jobs.passes.inputs import ImagesInput, check_images_manifest
from ray_jobs.passes.output import PassOutput, arrow_filesystem
from ray_jobs.passes.resources import model_actor_resources
from ray_jobs.passes.stats import BatchFigures, StatsRelay, send_batch_figures
from ray_jobs.progress import FleetProgress
from ray_jobs.state.generations import SCHEMA as GENERATIONS_SCHEMA
from ray_jobs.state.manifest import ManifestError, subjects_of_run
from ray_jobs.state.run_dir import RunDirectory, now

INPUT_COLUMNS = ["id", "subject_id", "prompt", "prompt_index", "image_index", "image"]
SCORES = ("dino", "clip_i", "clip_t")
SCHEMA = pa.schema([
    *(GENERATIONS_SCHEMA.field(name) for name in INPUT_COLUMNS),
    ("class_prompt", pa.bool_()),  # made from the subject's bare class prompt: counts towards PRES, not fidelity
    *((name, pa.float64()) for name in SCORES),  # null where the row failed
    ("error", pa.string()), ("dino_model", pa.string()), ("clip_model", pa.string()),
])  # fmt: skip
READ_THREADS = 8  # reading images is storage round trips: overlap them
REFERENCE_CACHE = 1024  # subjects whose photo embeddings an actor keeps (rows arrive grouped by subject)


@dataclass
class EvaluateRequest:
    run: str
    settings: Settings
    address: str | None = None
    verbose: bool = False
    show_progress: bool = True


@dataclass(frozen=True)
class SubjectPhotos:
    """What scoring needs of a subject: its real photos, and the prompt whose generations measure PRES."""

    photos: tuple[str, ...]
    class_prompt: str | None


# -- the scoring actor ------------------------------------------------------------------------------------------


class EvaluationScorer:
    """A model actor: both evaluation models, loaded once; scores batches of generated images."""

    def __init__(self, settings: Settings, subjects: list, inbox=None):
        import ray

        from engine.evaluation import Evaluator

        self.evaluator = Evaluator(settings.eval_dino_model, settings.eval_clip_model)
        # Passed as [ref]: Ray resolves an actor's top-level ObjectRef arguments, but not one inside Ray Data's kwargs.
        self.subjects: dict[str, SubjectPhotos] = ray.get(subjects[0])
        self.settings, self.inbox = settings, inbox
        self.references: OrderedDict[str, Any] = OrderedDict()  # subject id -> Embeddings, or why it has none
        self.pool = ThreadPoolExecutor(READ_THREADS)

    def _image(self, uri: str) -> Image.Image | str:
        try:
            return read_image(uri, max_pixels=self.settings.max_image_pixels, min_side=1)
        except ImageError as err:
            return f"generated image: {err}"

    def _reference(self, subject_id: str):
        if subject_id in self.references:
            self.references.move_to_end(subject_id)
            return self.references[subject_id]
        subject = self.subjects.get(subject_id)
        if subject is None:
            found = f"subject {subject_id!r} is in none of the run's readable manifests: no photos to compare with"
        else:
            photos = list(self.pool.map(self._image, subject.photos))
            unreadable = [p.replace("generated image", "subject photo") for p in photos if isinstance(p, str)]
            found = unreadable[0] if unreadable else self.evaluator.image_embeddings(photos)
        self.references[subject_id] = found
        if len(self.references) > REFERENCE_CACHE:
            self.references.popitem(last=False)
        return found

    def __call__(self, batch: pa.Table) -> pa.Table:
        began = time.perf_counter()
        rows = {name: batch.column(name).to_pylist() for name in INPUT_COLUMNS}
        count = batch.num_rows
        errors: list[str | None] = [None] * count
        scores: dict[str, list[float | None]] = {name: [None] * count for name in SCORES}
        images = list(self.pool.map(self._image, rows["image"]))
        references = [self._reference(sid) for sid in rows["subject_id"]]
        for i in range(count):
            errors[i] = next((x for x in (references[i], images[i]) if isinstance(x, str)), None)
        ok = [i for i in range(count) if errors[i] is None]
        if ok:
            try:
                found = self.evaluator.score([images[i] for i in ok], [rows["prompt"][i] for i in ok],
                                             [references[i] for i in ok])  # fmt: skip
                for i, result in zip(ok, found):
                    for name in SCORES:
                        scores[name][i] = getattr(result, name)
            except Exception as err:  # the whole batch failed (e.g. out of memory): each row says so, none is lost
                for i in ok:
                    errors[i] = f"model: {type(err).__name__}: {err}"
        classes = [self.subjects.get(sid) for sid in rows["subject_id"]]
        columns = {name: rows[name] for name in INPUT_COLUMNS}
        columns["class_prompt"] = [s is not None and s.class_prompt is not None and p.strip() == s.class_prompt.strip()
                                   for s, p in zip(classes, rows["prompt"])]  # fmt: skip
        table = pa.table({**columns, **scores, "error": errors, "dino_model": [self.evaluator.dino_model] * count,
                          "clip_model": [self.evaluator.clip_model] * count}, schema=SCHEMA)  # fmt: skip
        failed = sum(e is not None for e in errors)
        kept = {name: [v for v in values if v is not None] for name, values in scores.items()}
        send_batch_figures(self.inbox, BatchFigures(count, failed, time.perf_counter() - began, scores=kept))
        return table


# -- the pass ---------------------------------------------------------------------------------------------------


def evaluate(request: EvaluateRequest, metrics=None) -> int:
    """Score every generated image of RUN not scored yet, then each subject's means. Returns the exit status."""
    from engine.evaluation import resolve_eval_model

    run = RunDirectory(request.run)
    record = run.require_run()
    source = run.generations
    if not storage.exists(source):
        raise ManifestError(f"{source}: nothing generated yet; run `dreamfleet generate` first")
    generations = check_images_manifest(source)
    if generations.num_rows == 0:
        print(json.dumps({"output": run.evaluation, "rows": 0, "note": "nothing was generated"}))
        return exit_status.OK
    settings = request.settings
    # Models are resolved here first: one not at hand fails the command before any cluster starts.
    resolve_eval_model(settings.eval_dino_model, "dino")
    resolve_eval_model(settings.eval_clip_model, "clip")
    subjects, notes = subjects_of_run(record)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    output = PassOutput(run.evaluation)
    output.prepare()
    forget_other_models(output, settings)
    if not output.holds_every_id(generations):
        photos = {sid: SubjectPhotos(s.instance_images, s.class_prompt) for sid, s in subjects.items()}
        _run_pass(request, generations, output, photos, metrics)
    rows, errors = output.summary()
    means = subject_means(output)
    write_subject_means(run, means, settings)
    print(json.dumps({"output": output.uri, "rows": rows, "rows_with_errors": errors, "subjects": len(means)}))
    return exit_status.OK if errors == 0 else exit_status.SOME_FAILED


def forget_other_models(output: PassOutput, settings: Settings) -> None:
    """Scores from other evaluation models are not comparable: start the table over rather than mix them."""
    if not output.data_files():
        return
    table = _scores_table(output, ["dino_model", "clip_model"])
    used = {(d, c) for d, c in zip(table.column("dino_model").to_pylist(), table.column("clip_model").to_pylist())}
    if used == {(settings.eval_dino_model, settings.eval_clip_model)}:
        return
    print(f"note: {output.uri} holds scores of other evaluation models ({sorted(used)}); scoring every image again",
          file=sys.stderr)  # fmt: skip
    for path in (output.path, output.checkpoint_path):
        if output.fs.exists(path):
            output.fs.rm(path, recursive=True)


def _run_pass(request: EvaluateRequest, generations: ImagesInput, output: PassOutput, photos: dict[str, SubjectPhotos],
              metrics) -> None:  # fmt: skip
    import ray

    connect(request.address, request.verbose)
    settings = request.settings
    gpus, actor_cpus = model_actor_resources("eval", settings.eval_concurrency, settings.eval_gpus_per_actor,
                                             settings.eval_cpus_per_actor, output.resuming())  # fmt: skip
    with output.checkpointed(request.verbose):
        ds = ray.data.read_parquet(list(generations.files), filesystem=arrow_filesystem(generations.filesystem),
                                   columns=INPUT_COLUMNS)  # fmt: skip
        ds = ds.repartition(target_num_rows_per_block=settings.vlm_rows_per_file)  # as VLM passes; see analyze.py
        left = max(0, generations.num_rows - output.committed_rows())
        progress = FleetProgress(left, enabled=request.show_progress, label="evaluated images")
        with progress, eval_stats_relay(metrics, progress) as relay:
            ds = ds.map_batches(
                EvaluationScorer,
                fn_constructor_kwargs={"settings": settings, "subjects": [ray.put(photos)], "inbox": relay.inbox},
                batch_size=settings.eval_batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=settings.eval_concurrency),
                num_gpus=gpus,
                num_cpus=actor_cpus,
            )
            output.write(ds, settings.vlm_rows_per_file)


@contextmanager
def eval_stats_relay(metrics, progress: FleetProgress) -> Iterator[StatsRelay]:
    def on_batch(figures: BatchFigures) -> None:
        progress.add(figures.rows - figures.errors, figures.errors)
        if metrics is not None:
            metrics.on_eval_batch(figures)

    with StatsRelay(on_batch) as relay:
        yield relay


# -- per-subject means --------------------------------------------------------------------------------------------


def _scores_table(output: PassOutput, columns: list[str]) -> pa.Table:
    dataset = pds.dataset(output.data_files(), filesystem=output.arrow_filesystem(), format="parquet")
    return dataset.to_table(columns=columns)


def subject_means(output: PassOutput) -> dict[str, dict[str, Any]]:
    """Each subject's evaluation: means of its subject-prompt images, PRES of its class-prompt ones, row counts."""
    table = _scores_table(output, ["subject_id", "class_prompt", "error", *SCORES])
    scored = table.filter(pc.field("error").is_null())
    fidelity = scored.filter(~pc.field("class_prompt")).group_by("subject_id").aggregate(
        [("dino", "mean"), ("clip_i", "mean"), ("clip_t", "mean"), ("subject_id", "count")]
    )
    pres = scored.filter(pc.field("class_prompt")).group_by("subject_id").aggregate(
        [("dino", "mean"), ("subject_id", "count")]
    )
    failed = table.filter(pc.field("error").is_valid()).group_by("subject_id").aggregate([("subject_id", "count")])
    means: dict[str, dict[str, Any]] = {}
    for sid in set(table.column("subject_id").to_pylist()):
        means[sid] = {"images": 0, "errors": 0, "dino": None, "clip_i": None, "clip_t": None, "pres": None,
                      "class_images": 0}  # fmt: skip
    for row in fidelity.to_pylist():
        means[row["subject_id"]].update(dino=row["dino_mean"], clip_i=row["clip_i_mean"], clip_t=row["clip_t_mean"],
                                        images=row["subject_id_count"])  # fmt: skip
    for row in pres.to_pylist():
        entry = means[row["subject_id"]]
        entry.update(pres=row["dino_mean"], class_images=row["subject_id_count"])
        entry["images"] += row["subject_id_count"]
    for row in failed.to_pylist():
        means[row["subject_id"]]["errors"] = row["subject_id_count"]
    return means


def write_subject_means(run: RunDirectory, means: dict[str, dict[str, Any]], settings: Settings) -> None:
    """Each evaluated subject's means into its status.json (the driver is the only writer of statuses). A status
    that already holds them is left alone, so a rerun with nothing new to score rewrites no status."""
    models = {"dino_model": settings.eval_dino_model, "clip_model": settings.eval_clip_model}

    def write(subject_id: str) -> None:
        status = run.read_status(subject_id)
        evaluation = {**means[subject_id], **models}
        if status is None or {k: (status.evaluation or {}).get(k) for k in evaluation} == evaluation:
            return
        status.evaluation = {**evaluation, "evaluated_at": now()}
        run.write_status(status)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        list(pool.map(write, means))
