"""The fleet scheduler: hands a plan's jobs to long-lived worker actors, one job per actor at a time.

- Class-image sets first, each on exactly one actor; a subject waits only for its own set.
- A subject moves through its stages (train, then generate) on whichever worker is free; its state in RUN follows:
  pending → training → trained → generating → done, or failed with the reason.
- At most one job in flight per actor: the driver holds a bounded number of futures whatever the manifest's size.
- A subject's failure is retried up to `max_attempts` (an OOM retry turns on gradient checkpointing, then halves the
  micro-batch); a dead worker is replaced and its subject re-queued, resuming from its last checkpoint. A death
  after the subject made progress (a new checkpoint, new images) does not use up one of its attempts.
- Every state change is written to RUN at once: the driver can be killed at any point and rerun.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from engine import storage
from engine.checkpoints import complete_steps
from engine.settings import Settings
from ray_jobs.plan import ClassSetJob, FleetPlan, SubjectJob
from ray_jobs.progress import FleetProgress
from ray_jobs.run_dir import RunDirectory, subject_dir, summarize
from ray_jobs.worker import SubjectWorker

RUNNING_STATE = {"train": "training", "generate": "generating"}
FINISHED_STATE = {"train": "trained", "generate": "done"}
BEFORE_STATE = {"train": "pending", "generate": "trained"}
HISTORY_FIELDS = ("ok", "error", "resumed_from", "steps_run", "images", "images_generated", "seconds", "final_loss")


class FleetError(RuntimeError):
    """The fleet cannot make progress at all (e.g. no worker can even start)."""


@dataclass
class FleetOptions:
    base_model: str
    num_workers: int
    gpus_per_job: float
    cpus_per_job: float = 1.0
    cache_dir: str | None = None
    worker_class: type = SubjectWorker  # a stand-in with the same methods serves the scheduling benchmark


def worker_slots(gpus_per_job: float, cpus_per_job: float, requested: int | None, local: bool) -> tuple[int, float]:
    """How many workers to start and the GPU share each asks for.

    By default, as many workers as the cluster's GPUs hold at `gpus_per_job` each. A local cluster without GPUs
    (a laptop, CI) runs CPU workers instead of waiting forever for a GPU; a remote cluster keeps the request, since
    its autoscaler may still add GPU nodes.
    """
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if local and gpus == 0:
        gpus_per_job = 0.0
    if requested:
        return requested, gpus_per_job
    if gpus > 0 and gpus_per_job > 0:
        return max(1, int(gpus / gpus_per_job + 1e-9)), gpus_per_job
    return max(1, int(resources.get("CPU", 1) / max(cpus_per_job, 1e-9) + 1e-9)), gpus_per_job


def oom_adjusted(settings: Settings) -> Settings:
    """Settings that need less memory for the same effective batch."""
    if not settings.gradient_checkpointing:
        return settings.model_copy(update={"gradient_checkpointing": True})
    if settings.train_batch_size > 1:
        return settings.model_copy(
            update={
                "train_batch_size": settings.train_batch_size // 2,
                "gradient_accumulation_steps": settings.gradient_accumulation_steps * 2,
            }
        )
    return settings


class FleetScheduler:
    def __init__(
        self,
        run: RunDirectory,
        plan: FleetPlan,
        options: FleetOptions,
        max_attempts: int,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        show_progress: bool = True,
    ):
        self.run_dir = run
        self.plan = plan
        self.options = options
        self.max_attempts = max_attempts
        self.on_event = on_event or (lambda kind, data: None)
        self.progress = FleetProgress(len(plan.subjects), enabled=show_progress)
        self.queue: deque[ClassSetJob | SubjectJob] = deque()
        self.waiting: dict[str, list[SubjectJob]] = {}
        self.ready_sets: dict[str, list[str]] = {}
        self.set_attempts: dict[str, int] = {}
        self.in_flight: dict[ray.ObjectRef, tuple[Any, ClassSetJob | SubjectJob]] = {}
        self.idle: deque = deque()
        self.starting: dict[ray.ObjectRef, Any] = {}  # identity call of each worker still loading -> the worker
        self.identities: dict[Any, dict[str, Any]] = {}  # started workers -> their pid, node and GPU ids
        self.start_step: dict[str, int] = {}  # checkpoint step of each subject when first handed out here
        self.worker_deaths = 0  # in a row, no job returning in between: many means the fleet itself is broken

    # -- workers -------------------------------------------------------------------------------------------------

    def _start_worker(self):
        cls = ray.remote(self.options.worker_class).options(
            num_gpus=self.options.gpus_per_job, num_cpus=self.options.cpus_per_job, max_restarts=0
        )
        actor = cls.remote(self.options.base_model, self.options.cache_dir)
        # A worker joins the idle pool only when its identity call returns, i.e. once its model is loaded: the
        # driver never blocks on a starting worker, so the others keep working while it loads.
        self.starting[actor.identity.remote()] = actor

    def _started(self, ref: ray.ObjectRef) -> None:
        actor = self.starting.pop(ref)
        try:
            self.identities[actor] = ray.get(ref)
        except RayActorError:  # it could not even load the model
            self._replace(actor)
            return
        self.idle.append(actor)

    def _replace(self, actor) -> None:
        self.worker_deaths += 1
        if self.worker_deaths > 3 * self.options.num_workers + 3:
            raise FleetError(f"{self.worker_deaths} workers died in a row, none finishing a job in between; "
                             "the cause is not one subject")  # fmt: skip
        ray.kill(actor, no_restart=True)
        self.identities.pop(actor, None)
        self._start_worker()
        self.on_event("worker_replaced", {})

    # -- queueing ------------------------------------------------------------------------------------------------

    def _enqueue_plan(self) -> None:
        from engine.class_images import ClassImageCache

        cache = ClassImageCache(self.run_dir.class_images)
        for job in self.plan.class_sets:
            uris = cache.lookup(job.key)
            if uris is not None:
                self.ready_sets[job.key] = uris
                self.on_event("class_set_cached", {"images": len(uris)})
            else:
                self.queue.append(job)
        for job in self.plan.subjects:
            if job.class_set is not None and job.class_set not in self.ready_sets:
                self.waiting.setdefault(job.class_set, []).append(job)
            else:
                self.queue.append(job)
            # A subject that failed before, or was interrupted mid-stage, is back before that stage; history stays.
            job.status.state = BEFORE_STATE[job.stage]
            self.run_dir.write_status(job.status)

    def _submit(self, actor, job: ClassSetJob | SubjectJob) -> None:
        if isinstance(job, ClassSetJob):
            ref = actor.make_class_set.remote(self.run_dir.class_images, job.class_prompt, job.settings)
            self.in_flight[ref] = (actor, job)
            return
        job.tries += 1
        job.status.state = RUNNING_STATE[job.stage]
        job.status.attempts += 1
        job.status.worker = self.identities[actor]
        self.run_dir.write_status(job.status)
        job.progress_at_submit = self._progress(job)
        if job.stage == "train":
            self.start_step.setdefault(job.subject.subject_id, job.progress_at_submit)
            ref = actor.train.remote(self.run_dir.uri, job.subject, job.settings, self.ready_sets.get(job.class_set))
        else:
            ref = actor.generate.remote(self.run_dir.uri, job.subject, job.settings)
        self.in_flight[ref] = (actor, job)

    def _progress(self, job: SubjectJob) -> int:
        """How far the subject's current stage has got, as RUN shows it: its newest checkpoint, or its images."""
        folder = subject_dir(self.run_dir.uri, job.subject.subject_id)
        if job.stage == "train":
            return (complete_steps(storage.join(folder, "checkpoints")) or [0])[-1]
        return sum(name.endswith(".png") for name in storage.listdir(storage.join(folder, "images")))

    # -- outcomes ------------------------------------------------------------------------------------------------

    def _class_set_done(self, job: ClassSetJob, outcome: dict[str, Any]) -> None:
        if outcome["ok"]:
            self.ready_sets[job.key] = outcome["uris"]
            self.on_event("class_set_generated", {"generated": outcome["generated"]})
            self.queue.extend(self.waiting.pop(job.key, []))
            return
        self.set_attempts[job.key] = self.set_attempts.get(job.key, 0) + 1
        if outcome.get("retryable", True) and self.set_attempts[job.key] < self.max_attempts:
            self.queue.appendleft(job)
            return
        for subject_job in self.waiting.pop(job.key, []):
            self._fail(subject_job, f"class images for {job.class_prompt!r} could not be made: {outcome['error']}")

    def _subject_done(self, job: SubjectJob, outcome: dict[str, Any]) -> None:
        status = job.status
        entry = {k: outcome.get(k) for k in HISTORY_FIELDS if k in outcome}
        status.history = [*(status.history or []), {"attempt": status.attempts, "stage": job.stage, **entry}]
        if outcome["ok"]:
            status.state, status.error = FINISHED_STATE[job.stage], None
            self.run_dir.write_status(status)
            new_steps = job.settings.max_train_steps - self.start_step.get(job.subject.subject_id, 0)
            self.on_event(f"{job.stage}_attempt", {"outcome": "success", "new_steps": new_steps, **outcome})
            job.stages, job.tries = job.stages[1:], 0
            if job.stages:
                self.queue.append(job)
            else:
                self.progress.finished(ok=True)
            return
        kind = "oom" if outcome.get("oom") else "worker_died" if outcome.get("worker_died") else "error"
        self.on_event(f"{job.stage}_attempt", {"outcome": kind, **outcome})
        if kind == "worker_died" and self._progress(job) > job.progress_at_submit:
            # The worker died after the subject made progress: a preempted node or a killed process, not a
            # subject that crashes its worker. Only deaths without progress count against max_attempts.
            job.tries -= 1
        if outcome.get("retryable", True) and job.tries < self.max_attempts:
            if outcome.get("oom") and job.stage == "train":
                job.settings = oom_adjusted(job.settings)
            # Back to the state before this stage: a retried generation keeps its subject's "trained" state.
            status.state, status.error = BEFORE_STATE[job.stage], outcome["error"]
            self.run_dir.write_status(status)
            self.queue.append(job)
            return
        self._fail(job, outcome["error"])

    def _fail(self, job: SubjectJob, reason: str) -> None:
        job.status.state, job.status.error = "failed", reason
        self.run_dir.write_status(job.status)
        self.progress.finished(ok=False)

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        """Run the plan to completion; returns counts of subjects by state."""
        self._enqueue_plan()
        work = len(self.queue) + sum(len(v) for v in self.waiting.values())
        for _ in range(min(self.options.num_workers, work)):
            self._start_worker()
        with self.progress:
            while self.queue or self.in_flight:
                while self.idle and self.queue:
                    self._submit(self.idle.popleft(), self.queue.popleft())
                done, _ = ray.wait([*self.in_flight, *self.starting], num_returns=1, timeout=1.0)
                for ref in done:
                    if ref in self.starting:
                        self._started(ref)
                        continue
                    actor, job = self.in_flight.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except RayActorError as err:
                        outcome = {"ok": False, "error": f"worker process died: {type(err).__name__}",
                                   "retryable": True, "worker_died": True}  # fmt: skip
                        self._replace(actor)
                    else:
                        self.idle.append(actor)
                        self.worker_deaths = 0
                    if isinstance(job, ClassSetJob):
                        self._class_set_done(job, outcome)
                    else:
                        self._subject_done(job, outcome)
                running = sum(isinstance(job, SubjectJob) for _, job in self.in_flight.values())
                self.progress.set_running(running)
                waiting = len(self.queue) + sum(len(jobs) for jobs in self.waiting.values())
                self.on_event("tick", {"queued": waiting, "running": running, "workers": len(self.identities),
                                       "counts": summarize(self.plan.statuses)})  # fmt: skip
        for actor in [*self.idle, *self.starting.values()]:
            ray.kill(actor, no_restart=True)
        self.identities.clear()
        self.on_event("tick", {"queued": 0, "running": 0, "workers": 0, "counts": summarize(self.plan.statuses)})
        return summarize(self.plan.statuses)
