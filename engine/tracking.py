"""Experiment tracking: each subject is one tracked run in TensorBoard, MLflow and/or W&B, grouped under its RUN,
with its settings, its training curves (step by step) and its generated images.

The driver starts the RUN's group once (`start_group`: MLflow's parent run) and hands the `TrackingGroup` to the
workers; a worker opens a `SubjectTracker` per subject it trains or renders. Many subjects train at once in one
process, so every tool is driven through its explicit-run API (one SummaryWriter, MlflowClient run id or W&B Run
per subject), never a process-wide active run. A tracker never fails the training: a tool's first error drops that
tool for that subject and is kept, as "tool: ErrorType: message", for the subject's history.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from engine import storage
from engine.diffusion.train import StepRecord
from engine.settings import VLM_SETTINGS, Settings

# Curve name in every tool -> StepRecord field
SCALARS = {
    "train/loss": "loss",
    "train/instance_loss": "instance_loss",
    "train/prior_loss": "prior_loss",
    "train/lr": "lr",
    "train/step_seconds": "seconds",
}
DEFAULT_PROJECT = "dreamfleet"  # MLflow experiment and W&B project unless MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT say
FLUSH_SECONDS = 10.0  # MLflow gets buffered metrics at least this often (and at every checkpoint)
# The tools' own configuration variables travel from the driver to the workers, so a worker on another node logs
# where the driver does. Credentials do not: workers get those from their own environment, as with storage.
FORWARDED_PREFIXES = ("MLFLOW_", "WANDB_")
SECRET_MARKERS = ("KEY", "TOKEN", "PASSWORD", "SECRET")


@dataclass(frozen=True)
class TrackingGroup:
    """What every tracked subject of one RUN shares; made by `start_group` on the driver, sent to the workers."""

    run_uri: str
    trackers: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # the tools' configuration variables of the driver
    wandb_project: str = DEFAULT_PROJECT
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_id: str | None = None
    mlflow_parent_run_id: str | None = None
    failed: dict[str, str] = field(default_factory=dict)  # tool -> why it is off for the whole RUN


def start_group(run_uri: str, trackers: Sequence[str]) -> TrackingGroup:
    """The RUN's group in every tool, made once per invocation: MLflow's parent run is found (a rerun continues it)
    or created. A tool that cannot start is off for the RUN, with its reason in `failed`; nothing raises."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(FORWARDED_PREFIXES) and not any(m in k for m in SECRET_MARKERS)}  # fmt: skip
    project = os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    group = TrackingGroup(run_uri, tuple(dict.fromkeys(trackers)), env, wandb_project=project)  # each tool once
    if "mlflow" in trackers:
        try:
            group = replace(group, **_mlflow_parent(run_uri))
        except Exception as err:  # the run goes on untracked by MLflow; every subject's history says why
            group = replace(group, failed={**group.failed, "mlflow": describe(err)})
    return group


def finish_group(group: TrackingGroup) -> str | None:
    """Mark MLflow's parent run finished at the end of an invocation; returns the error, if that failed."""
    if group.mlflow_parent_run_id is None:
        return None
    try:
        from mlflow import MlflowClient

        MlflowClient(group.mlflow_tracking_uri).set_terminated(group.mlflow_parent_run_id, "FINISHED")
    except Exception as err:
        return f"mlflow: {describe(err)}"
    return None


def describe(err: BaseException) -> str:
    """ErrorType: the first line of the message (HTTP clients write whole pages into theirs)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:400] if lines else ''}"


def tracked_settings(settings: Settings) -> dict[str, bool | int | float | str]:
    """The subject's training and generation settings as flat scalars (lists and None as JSON), resolved defaults
    in place of None where the engine resolves them."""
    values = {k: v for k, v in settings.model_dump().items() if k not in VLM_SETTINGS}
    values.update(learning_rate=settings.effective_learning_rate, lora_alpha=settings.effective_lora_alpha)
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in values.items()}


def _at_checkpoint(record: StepRecord, settings: Settings) -> bool:
    """Steps whose checkpoint was just written: what a tool holds by then survives a resume from that checkpoint."""
    return record.step % settings.checkpointing_steps == 0 or record.step == settings.max_train_steps


@dataclass(frozen=True)
class TrackedImage:
    prompt: str
    prompt_index: int
    image_index: int
    name: str  # the file name under the subject's images/ folder
    image: Any  # PIL.Image.Image


class ToolRun(Protocol):
    """One subject's run in one tool. Opened by its constructor:
    (group, subject_id, settings, subject_dir, training_from), see SubjectTracker."""

    tool: str

    def log_step(self, record: StepRecord) -> None: ...

    def log_images(self, images: list[TrackedImage]) -> None: ...

    def close(self, ok: bool) -> None: ...

    def abandon(self) -> None:
        """Release what this process holds for the run after one of its calls failed; never raises."""


class SubjectTracker:
    """One subject's runs in every tool of the group, opened for one training session or one generation."""

    def __init__(self, group: TrackingGroup, subject_id: str, settings: Settings, subject_dir: str,
                 training_from: int | None = None):  # fmt: skip
        """`training_from`: the checkpoint step this session's training continues from (0: the start); None when
        the session does not train (generation)."""
        self.errors = [f"{tool}: {group.failed[tool]}" for tool in group.trackers if tool in group.failed]
        self.runs: list[ToolRun] = []
        for tool in group.trackers:
            if tool in group.failed:
                continue
            try:
                self.runs.append(TOOL_RUNS[tool](group, subject_id, settings, subject_dir, training_from))
            except Exception as err:
                self.errors.append(f"{tool}: {describe(err)}")

    def log_step(self, record: StepRecord) -> None:
        self._each(lambda run: run.log_step(record))

    def log_images(self, rows: Sequence[dict[str, Any]]) -> None:
        """The subject's generated images, rows of generations.parquet (prompt, prompt_index, image_index, image)."""
        if not self.runs or not rows:
            return
        try:
            images = [_load_image(row) for row in rows]
        except Exception as err:
            self.errors.append(f"images: {describe(err)}")
            return
        self._each(lambda run: run.log_images(images))

    def close(self, ok: bool = True) -> list[str]:
        """End the session's runs (finished, or failed with the subject); returns every tracker error it had."""
        self._each(lambda run: run.close(ok))
        self.runs = []
        return self.errors

    def _each(self, call: Callable[[ToolRun], None]) -> None:
        for run in list(self.runs):
            try:
                call(run)
            except Exception as err:  # never the training's failure: this tool stops for this subject
                self.runs.remove(run)
                self.errors.append(f"{run.tool}: {describe(err)}")
                run.abandon()


def _load_image(row: dict[str, Any]) -> TrackedImage:
    from PIL import Image

    image = Image.open(io.BytesIO(storage.read_bytes(row["image"])))
    image.load()
    name = row["image"].rstrip("/").rsplit("/", 1)[-1]
    return TrackedImage(row["prompt"], row["prompt_index"], row["image_index"], name, image.convert("RGB"))


# -- TensorBoard: RUN/subjects/<id>/tensorboard, so `tensorboard --logdir RUN` shows every subject ----------------


class TensorBoardRun:
    """Events written locally, published to the subject's folder in RUN (any fsspec URI) at every checkpoint and
    at the end. Each session adds its own event file; a resumed session purges the steps after its checkpoint
    (TensorBoard's purge_step), so the curve has every step once and nothing of the earlier sessions is lost."""

    tool = "tensorboard"

    def __init__(self, group: TrackingGroup, subject_id: str, settings: Settings, subject_dir: str,
                 training_from: int | None):  # fmt: skip
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.settings = settings
        self.remote = storage.join(subject_dir, "tensorboard")
        self.local = tempfile.mkdtemp(prefix="dreamfleet-tensorboard-")
        purge_step = training_from + 1 if training_from is not None else None
        self.writer = SummaryWriter(self.local, purge_step=purge_step)
        for summary in hparams(tracked_settings(settings), {tag: None for tag in SCALARS}):  # the HParams tab
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("dreamfleet", f"RUN `{group.run_uri}`, subject `{subject_id}`")

    def log_step(self, record: StepRecord) -> None:
        for tag, name in SCALARS.items():
            self.writer.add_scalar(tag, getattr(record, name), record.step)
        if _at_checkpoint(record, self.settings):
            self._publish()

    def log_images(self, images: list[TrackedImage]) -> None:
        import numpy as np

        for item in images:
            tag = f"generated/prompt_{item.prompt_index}"
            self.writer.add_image(tag, np.asarray(item.image), item.image_index, dataformats="HWC")
            if item.image_index == 0:
                self.writer.add_text(f"prompts/prompt_{item.prompt_index}", item.prompt)

    def close(self, ok: bool) -> None:
        try:
            self.writer.close()
            self._publish()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)

    def abandon(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass
        shutil.rmtree(self.local, ignore_errors=True)

    def _publish(self) -> None:
        self.writer.flush()
        storage.upload_dir(Path(self.local), self.remote)  # this session's file only: the others stay as they are


# -- MLflow: a child run per subject under the RUN's parent run ----------------------------------------------------


def _quoted(value: str) -> str:
    """A string literal for an MLflow filter (it takes either quote, and has no escapes)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} has both kinds of quote; MLflow's search cannot match it")


def _mlflow_parent(run_uri: str) -> dict[str, str]:
    """The tracking URI, experiment and parent run of RUN: the parent found by its tags (a rerun continues it), or
    created, and set running."""
    import mlflow
    from mlflow import MlflowClient

    uri = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    query = f"tags.`dreamfleet.run` = {_quoted(run_uri)} and tags.`dreamfleet.role` = 'run'"
    found = client.search_runs([experiment_id], query, max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {"dreamfleet.run": run_uri, "dreamfleet.role": "run"}
        run_id = client.create_run(experiment_id, tags=tags, run_name=run_uri.rstrip("/").rsplit("/", 1)[-1]).info.run_id
    return {"mlflow_tracking_uri": uri, "mlflow_experiment_id": experiment_id, "mlflow_parent_run_id": run_id}


class MlflowRun:
    """The subject's child run (tags mlflow.parentRunId, dreamfleet.run, dreamfleet.subject_id), found again by a
    retry or a rerun. Metrics are buffered and sent in batches: at every checkpoint, every FLUSH_SECONDS and at the
    end; steps the run already holds (redone after a resume) are not sent twice."""

    tool = "mlflow"

    def __init__(self, group: TrackingGroup, subject_id: str, settings: Settings, subject_dir: str,
                 training_from: int | None):  # fmt: skip
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(group.mlflow_tracking_uri)
        self.settings = settings
        query = f"tags.`mlflow.parentRunId` = '{group.mlflow_parent_run_id}' and tags.`dreamfleet.subject_id` = '{subject_id}'"
        found = self.client.search_runs([group.mlflow_experiment_id], query, max_results=1)
        if found:
            run = found[0]
            self.client.update_run(run.info.run_id, status="RUNNING")
            history = self.client.get_metric_history(run.info.run_id, "train/loss")
            self.logged_through = max((m.step for m in history), default=0)
        else:
            tags = {"mlflow.parentRunId": group.mlflow_parent_run_id, "dreamfleet.run": group.run_uri,
                    "dreamfleet.subject_id": subject_id}  # fmt: skip
            run = self.client.create_run(group.mlflow_experiment_id, tags=tags, run_name=subject_id)
            self.logged_through = 0
        self.run_id = run.info.run_id
        # Params cannot change once logged: a retry with adjusted settings (e.g. after an OOM) keeps the first values
        new = [Param(k, str(v)) for k, v in tracked_settings(settings).items() if k not in run.data.params]
        for start in range(0, len(new), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=new[start : start + 100])
        self.pending: list = []
        self.flushed_at = time.monotonic()

    def log_step(self, record: StepRecord) -> None:
        from mlflow.entities import Metric

        if record.step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(tag, getattr(record, name), now, record.step) for tag, name in SCALARS.items()]
        if _at_checkpoint(record, self.settings) or time.monotonic() - self.flushed_at > FLUSH_SECONDS:
            self._flush()

    def log_images(self, images: list[TrackedImage]) -> None:
        for item in images:
            self.client.log_image(self.run_id, item.image, artifact_file=f"generated/{item.name}")
        prompts = {item.name: item.prompt for item in images}
        self.client.log_dict(self.run_id, prompts, "generated/prompts.json")

    def close(self, ok: bool) -> None:
        self._flush()
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def abandon(self) -> None:
        self.pending = []

    def _flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        self.pending = []
        self.flushed_at = time.monotonic()


# -- W&B: a run per subject, grouped by RUN, its id stable across retries and reruns --------------------------------


def wandb_run_id(run_uri: str, subject_id: str) -> str:
    return hashlib.sha256(f"{run_uri}\0{subject_id}".encode()).hexdigest()[:32]


class WandbRun:
    """wandb.init(reinit="create_new") gives each subject of a pack its own Run. The id is derived from (RUN,
    subject) with resume="allow", so a retry, a rerun and the generation continue the same run. Configured as W&B
    users configure it (WANDB_MODE, WANDB_ENTITY, WANDB_DIR, ...); the project is WANDB_PROJECT's, else dreamfleet.
    Mode and folder are the driver's, passed explicitly: W&B reads its environment once per process."""

    tool = "wandb"

    def __init__(self, group: TrackingGroup, subject_id: str, settings: Settings, subject_dir: str,
                 training_from: int | None):  # fmt: skip
        import wandb

        self.run = wandb.init(
            project=group.wandb_project, group=group.run_uri, name=subject_id,
            mode=group.env.get("WANDB_MODE"), dir=group.env.get("WANDB_DIR"),
            id=wandb_run_id(group.run_uri, subject_id), resume="allow", reinit="create_new",
            config=tracked_settings(settings), allow_val_change=True, tags=["dreamfleet", subject_id[:64]],
            # Subjects of a pack share the process: console capture would give each the whole pack's output.
            settings=wandb.Settings(console="off", silent=True),
        )  # fmt: skip

    def log_step(self, record: StepRecord) -> None:
        if record.step < self.run.starting_step:  # resumed online: W&B holds this step already
            return
        self.run.log({tag: getattr(record, name) for tag, name in SCALARS.items()}, step=record.step)

    def log_images(self, images: list[TrackedImage]) -> None:
        import wandb

        by_prompt: dict[int, list] = {}
        for item in images:
            by_prompt.setdefault(item.prompt_index, []).append(wandb.Image(item.image, caption=item.prompt))
        self.run.log({f"generated/prompt_{p}": shown for p, shown in sorted(by_prompt.items())})

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)

    def abandon(self) -> None:
        try:
            self.run.finish(exit_code=1)
        except Exception:
            pass


TOOL_RUNS: dict[str, Callable[..., ToolRun]] = {"tensorboard": TensorBoardRun, "mlflow": MlflowRun, "wandb": WandbRun}
