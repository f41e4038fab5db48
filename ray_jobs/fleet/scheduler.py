"""The fleet scheduler: hands a plan's jobs to long-lived worker actors, one call in flight per actor at a time.

- Class-image sets first, each on exactly one actor; a subject waits only for its own set.
- Training is packed: a worker trains up to `pack_subjects` LoRA subjects of one pack shape at once, in one UNet
  batch. The pack lives in the worker between calls; each call returns when one of its subjects ends, and the
  next call refills the freed slot at once (slots, not waves). A new pack takes an even share of the ready
  subjects, so idle workers are not left empty while one packs everything. Full fine-tunes train alone.
- Generation is packed too: a worker with no subjects in training renders up to `pack_subjects` subjects together.
- A subject moves through its stages (train, then generate) on whichever worker is free; its state in RUN follows:
  pending → training → trained → generating → done, or failed with the reason.
- A subject's failure is retried up to `max_attempts`. An OOM of a pack halves that worker's pack and retries its
  subjects without counting it against them; alone, an OOM retry turns on gradient checkpointing, then halves the
  micro-batch. A dead worker is replaced and each of its subjects re-queued, resuming from its own newest
  checkpoint. A death after the subject made progress (a new checkpoint, new images) does not use up one of its
  attempts.
- A data-parallel subject (`data_parallel` N > 1) trains on N workers with empty packs at once, one rank each: idle
  workers are held back for it until N are free, rather than starving it. Its ranks' outcomes make one attempt:
  any dead rank makes it a worker death (the dead replaced, the others back to idle); else rank 0's outcome counts.
- Every state change is written to RUN at once: the driver can be killed at any point and rerun.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from engine import storage
from engine.diffusion.checkpoints import complete_steps
from engine.diffusion.generation import render_shape
from engine.diffusion.subject import CHECKPOINTS, IMAGES
from engine.diffusion.train import pack_shape
from engine.settings import Settings
from engine.tracking import TrackingGroup
from ray_jobs.fleet.outcome import ClassSetOutcome, Outcome
from ray_jobs.fleet.worker import SubjectWorker
from ray_jobs.progress import FleetProgress
from ray_jobs.state.plan import ClassSetJob, FleetPlan, SubjectJob
from ray_jobs.state.run_dir import RunDirectory, subject_dir, summarize
from ray_jobs.state.states import FAILED, STAGES

RENDEZVOUS_SECONDS = 60.0  # an idle worker answers at once; one that does not is treated as dead
# After a rank of a data-parallel attempt died, how long the others get to find out and leave the group: gloo tells
# them at once, but nccl (or a vanished node) only when a collective times out, so then they are ended and replaced.
GROUP_GRACE_SECONDS = 60.0


class FleetError(RuntimeError):
    """The fleet cannot make progress at all (e.g. no worker can even start)."""


@dataclass
class GroupAttempt:
    """One attempt of a data-parallel subject: the worker of each rank, and each rank's outcome as it returns
    (None: that worker died)."""

    job: SubjectJob
    ranks: list
    outcomes: dict[int, Outcome | None]
    rank_lost_at: float | None = None  # time.monotonic() when the first rank's worker died


@dataclass
class FleetOptions:
    base_model: str
    num_workers: int
    gpus_per_job: float
    cpus_per_job: float = 1.0
    cache_dir: str | None = None
    pack_subjects: int = 1
    mixed_precision: str | None = None  # the run's setting: frozen weights are stored in it on a GPU
    worker_class: type = SubjectWorker  # a stand-in with the same methods serves the scheduling benchmark
    tracking: TrackingGroup | None = None  # the RUN's experiment trackers, started by the driver (engine/tracking.py)


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


def group_outcome(subject_id: str, outcomes: dict[int, Outcome | None], workers: list[dict[str, Any]]) -> Outcome:
    """The one outcome of a data-parallel attempt from its ranks' (rank -> outcome in the order they returned; None:
    that rank's worker died).

    A dead rank makes it a worker death (named by the first to die). Otherwise rank 0's outcome counts, unless it
    failed because another rank did (a lost peer): then that rank's own failure, an out-of-memory first (so the retry
    needs less memory).
    """
    peak = max(o.peak_gpu_memory_bytes if o is not None else 0 for o in outcomes.values())
    dead = [rank for rank, o in outcomes.items() if o is None]
    if dead:
        error = f"worker process died: rank {dead[0]} of {len(outcomes)}"
        return Outcome.died(subject_id, error, workers=workers, peak_gpu_memory_bytes=peak)
    failed = [outcomes[rank] for rank in sorted(outcomes) if not outcomes[rank].ok]
    if outcomes[0].ok:
        return outcomes[0].replace(workers=workers, peak_gpu_memory_bytes=peak)
    own = [o for o in failed if not o.peer_failed]
    cause = next((o for o in own if o.oom), None) or (own or failed)[0]
    return cause.replace(workers=workers, peak_gpu_memory_bytes=peak)


def _trains_like(job: SubjectJob) -> Callable[[SubjectJob], bool]:
    """Whether another job's next stage is training that can share a pack with `job`'s."""
    shape = pack_shape(job.settings)
    return lambda other: other.stage == "train" and pack_shape(other.settings) == shape


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
        # call in flight -> (its worker, what it carries: a class set, or the subject jobs it admitted / renders)
        self.in_flight: dict[ray.ObjectRef, tuple[Any, str, Any]] = {}
        self.idle: deque = deque()
        self.starting: dict[ray.ObjectRef, Any] = {}  # identity call of each worker still loading -> the worker
        self.identities: dict[Any, dict[str, Any]] = {}  # started workers -> their pid, node and GPU ids
        self.packs: dict[Any, dict[str, SubjectJob]] = {}  # each worker's subjects in training, by subject id
        self.capacity: dict[Any, int] = {}  # each worker's pack size; halved by an OOM of the pack
        self.start_step: dict[str, int] = {}  # checkpoint step of each subject when first handed out here
        self.worker_deaths = 0  # in a row, no job returning in between: many means the fleet itself is broken

    # -- workers -------------------------------------------------------------------------------------------------

    def _start_worker(self):
        tracking = self.options.tracking
        # The trackers' configuration (MLFLOW_*, WANDB_*) as the driver has it: a worker's own environment is its
        # node's, or that of a local cluster started before the driver's was set.
        runtime_env = {"env_vars": tracking.env} if tracking is not None and tracking.env else None
        cls = ray.remote(self.options.worker_class).options(
            num_gpus=self.options.gpus_per_job, num_cpus=self.options.cpus_per_job, max_restarts=0,
            runtime_env=runtime_env,
        )  # fmt: skip
        extra = {"tracking": tracking} if tracking is not None else {}
        actor = cls.remote(self.options.base_model, self.options.cache_dir, mixed_precision=self.options.mixed_precision,
                           **extra)  # fmt: skip
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
        self.packs[actor], self.capacity[actor] = {}, self.options.pack_subjects
        self.idle.append(actor)

    def _replace(self, actor) -> None:
        self.worker_deaths += 1
        if self.worker_deaths > 3 * self.options.num_workers + 3:
            raise FleetError(f"{self.worker_deaths} workers died in a row, none finishing a job in between; "
                             "the cause is not one subject")  # fmt: skip
        ray.kill(actor, no_restart=True)
        for table in (self.identities, self.packs, self.capacity):
            table.pop(actor, None)
        self._start_worker()
        self.on_event("worker_replaced", {})

    # -- queueing ------------------------------------------------------------------------------------------------

    def _enqueue_plan(self) -> None:
        from engine.diffusion.class_images import ClassImageCache

        cache = ClassImageCache(self.run_dir.class_images)
        subjects = []
        for job in self.plan.subjects:
            reason = self._unrunnable(job)
            if reason is None:
                subjects.append(job)
            else:
                self._fail(job, reason)
        needed = {job.class_set for job in subjects}
        for job in [c for c in self.plan.class_sets if c.key in needed]:
            uris = cache.lookup(job.key)
            if uris is not None:
                self.ready_sets[job.key] = uris
                self.on_event("class_set_cached", {"images": len(uris)})
            else:
                self.queue.append(job)
        for job in subjects:
            if job.class_set is not None and job.class_set not in self.ready_sets:
                self.waiting.setdefault(job.class_set, []).append(job)
            else:
                self.queue.append(job)
            # A subject that failed before, or was interrupted mid-stage, is back before that stage; history stays.
            job.status.state = STAGES[job.stage].before
            self.run_dir.write_status(job.status)

    def _unrunnable(self, job: SubjectJob) -> str | None:
        """Why this fleet can never train the subject (its data_parallel), or None."""
        n, workers, gpus = job.settings.data_parallel, self.options.num_workers, self.options.gpus_per_job
        if job.stage != "train" or n == 1:
            return None
        if n > workers:
            return f"data_parallel={n} needs {n} workers; this fleet has {workers}"
        if 0 < gpus < 1:  # two ranks on one GPU: NCCL refuses them, and they would only share its memory
            return f"data_parallel={n} needs a whole GPU per worker (--gpus-per-job 1 or more), not {gpus}"
        return None

    def _take(self, wanted: Callable[[SubjectJob], bool], limit: int) -> list[SubjectJob]:
        """Up to `limit` queued subject jobs that `wanted` accepts, in queue order, taken off the queue."""
        taken = [job for job in self.queue if isinstance(job, SubjectJob) and wanted(job)][:limit]
        for job in taken:
            self.queue.remove(job)
        return taken

    def _dispatch(self) -> None:
        """Give every idle worker its next call: refill its pack, or start one, or a class set, or a generation."""
        for actor in list(self.idle):
            if actor not in self.idle:  # taken as a rank of a data-parallel subject in this pass
                continue
            pack = self.packs[actor]
            if pack:  # its pack goes on, with compatible ready subjects in its free slots
                fits = _trains_like(next(iter(pack.values())))
                self._submit_train(actor, self._take(fits, self.capacity[actor] - len(pack)))
            elif not self.queue:
                continue
            elif isinstance(self.queue[0], ClassSetJob):
                self._submit_class_set(actor, self.queue.popleft())
            elif self.queue[0].stage == "train" and self.queue[0].settings.data_parallel > 1:
                self._submit_group(self.queue[0])  # until enough are free, every empty idle worker waits for it
                continue
            elif self.queue[0].stage == "train":
                fits, lora = _trains_like(self.queue[0]), self.queue[0].settings.mode == "lora"
                ready = sum(isinstance(j, SubjectJob) and fits(j) for j in self.queue)
                empty = sum(not self.packs[a] for a in self.idle) + len(self.starting)
                share = math.ceil(ready / max(1, empty))  # an even share, so no worker waits empty
                limit = min(self.capacity[actor], share) if lora else 1
                self._submit_train(actor, self._take(fits, limit))
            else:
                shape, lora = render_shape(self.queue[0].settings), self.queue[0].settings.mode == "lora"
                limit = self.options.pack_subjects if lora else 1
                self._submit_generate(actor, self._take(lambda j: j.stage == "generate" and render_shape(j.settings) == shape, limit))
            self.idle.remove(actor)

    def _submit_class_set(self, actor, job: ClassSetJob) -> None:
        ref = actor.make_class_set.remote(self.run_dir.class_images, job.class_prompt, job.settings)
        self.in_flight[ref] = (actor, "class_set", job)

    def _begin_attempt(self, actor, job: SubjectJob, ranks: list | None = None) -> None:
        job.tries += 1
        job.status.state = STAGES[job.stage].running
        job.status.attempts += 1
        job.status.worker = self.identities[actor]
        if ranks is not None:  # data-parallel: rank 0's worker, and every rank's
            job.status.worker = {**job.status.worker, "ranks": [self.identities[a] for a in ranks]}
        self.run_dir.write_status(job.status)
        job.progress_at_submit = self._progress(job)
        if job.stage == "train":
            self.start_step.setdefault(job.subject.subject_id, job.progress_at_submit)

    def _submit_train(self, actor, admit: list[SubjectJob]) -> None:
        for job in admit:
            self._begin_attempt(actor, job)
            self.packs[actor][job.subject.subject_id] = job
        assignments = [(j.subject, j.settings, self.ready_sets.get(j.class_set)) for j in admit]
        ref = actor.train.remote(self.run_dir.uri, assignments, self.capacity[actor])
        self.in_flight[ref] = (actor, "train", admit)

    def _submit_group(self, job: SubjectJob) -> None:
        """Start a data-parallel subject on `data_parallel` idle workers with empty packs, if that many are idle:
        rank 0 names the rendezvous, then every rank joins it and trains."""
        free = [a for a in self.idle if not self.packs[a]]
        if len(free) < job.settings.data_parallel:
            return
        ranks = free[: job.settings.data_parallel]
        self.queue.remove(job)
        for actor in ranks:
            self.idle.remove(actor)
        try:  # an idle worker answers in milliseconds; the driver waits for it so each rank's own death stays its own
            rendezvous = ray.get(ranks[0].rendezvous.remote(), timeout=RENDEZVOUS_SECONDS)
        except (RayActorError, GetTimeoutError):
            self._replace(ranks[0])
            self.idle.extend(ranks[1:])
            self.queue.appendleft(job)
            return
        self._begin_attempt(ranks[0], job, ranks)
        attempt = GroupAttempt(job, ranks, {})
        assignment = (job.subject, job.settings, self.ready_sets.get(job.class_set))
        for rank, actor in enumerate(ranks):
            self.packs[actor][job.subject.subject_id] = job  # every rank's worker is busy with it
            ref = actor.train_data_parallel.remote(self.run_dir.uri, assignment, rank, rendezvous)
            self.in_flight[ref] = (actor, "train_group", (attempt, rank))

    def _submit_generate(self, actor, jobs: list[SubjectJob]) -> None:
        for job in jobs:
            self._begin_attempt(actor, job)
        ref = actor.generate.remote(self.run_dir.uri, [(j.subject, j.settings) for j in jobs])
        self.in_flight[ref] = (actor, "generate", jobs)

    def _progress(self, job: SubjectJob) -> int:
        """How far the subject's current stage has got, as RUN shows it: its newest checkpoint, or its images."""
        folder = subject_dir(self.run_dir.uri, job.subject.subject_id)
        if job.stage == "train":
            return (complete_steps(storage.join(folder, CHECKPOINTS)) or [0])[-1]
        return sum(name.endswith(".png") for name in storage.listdir(storage.join(folder, IMAGES)))

    # -- outcomes ------------------------------------------------------------------------------------------------

    def _returned(self, ref: ray.ObjectRef) -> None:
        actor, kind, payload = self.in_flight.pop(ref)
        if kind == "train_group":
            self._rank_returned(ref, *payload)
            return
        try:
            result = ray.get(ref)
        except RayActorError as err:
            error = f"worker process died: {type(err).__name__}"
            jobs = list(self.packs.get(actor, {}).values()) if kind == "train" else payload
            self._replace(actor)
            if kind == "class_set":
                self._class_set_done(payload, ClassSetOutcome(False, error=error))
            for job in jobs if kind != "class_set" else []:
                self._subject_done(job, Outcome.died(job.subject.subject_id, error))
            return
        self.worker_deaths = 0
        self.idle.append(actor)
        if kind == "class_set":
            self._class_set_done(payload, result)
        elif kind == "train":
            for outcome in result.ended:
                job = self.packs[actor].pop(outcome.subject_id)
                if outcome.oom and outcome.pack_size > 1:
                    # The pack did not fit: this worker packs half as many from now on.
                    self.capacity[actor] = max(1, min(self.capacity[actor], outcome.pack_size // 2))
                self._subject_done(job, outcome)
        else:
            for job, outcome in zip(payload, result):
                self._subject_done(job, outcome)

    def _rank_returned(self, ref: ray.ObjectRef, attempt: GroupAttempt, rank: int) -> None:
        """One rank of a data-parallel attempt returned (or its worker died); the attempt ends with its last rank."""
        try:
            attempt.outcomes[rank] = ray.get(ref)
        except RayActorError:
            attempt.outcomes[rank] = None
            attempt.rank_lost_at = attempt.rank_lost_at or time.monotonic()
        if len(attempt.outcomes) < len(attempt.ranks):
            return  # the others still train, or are finding out that a peer is gone (collectives fail, then leave)
        workers = [self.identities[a] for a in attempt.ranks]
        for rank, actor in enumerate(attempt.ranks):
            self.packs[actor].pop(attempt.job.subject.subject_id, None)
            if attempt.outcomes[rank] is None:
                self._replace(actor)
            else:  # it left the process group: idle, its model loaded, ready for anything
                self.idle.append(actor)
        if None not in attempt.outcomes.values():
            self.worker_deaths = 0
        self._subject_done(attempt.job, group_outcome(attempt.job.subject.subject_id, attempt.outcomes, workers))

    def _end_stuck_ranks(self) -> None:
        """Kill the ranks still in flight GROUP_GRACE_SECONDS after a peer of theirs died (they return as dead)."""
        for actor, kind, payload in list(self.in_flight.values()):
            lost_at = payload[0].rank_lost_at if kind == "train_group" else None
            if lost_at is not None and time.monotonic() - lost_at > GROUP_GRACE_SECONDS:
                ray.kill(actor, no_restart=True)

    def _class_set_done(self, job: ClassSetJob, outcome: ClassSetOutcome) -> None:
        if outcome.ok:
            self.ready_sets[job.key] = outcome.uris
            self.on_event("class_set_generated", {"generated": outcome.generated})
            self.queue.extend(self.waiting.pop(job.key, []))
            return
        self.set_attempts[job.key] = self.set_attempts.get(job.key, 0) + 1
        if outcome.retryable and self.set_attempts[job.key] < self.max_attempts:
            self.queue.appendleft(job)
            return
        for subject_job in self.waiting.pop(job.key, []):
            self._fail(subject_job, f"class images for {job.class_prompt!r} could not be made: {outcome.error}")

    def _subject_done(self, job: SubjectJob, outcome: Outcome) -> None:
        status = job.status
        entry = outcome.history_entry()
        status.history = [*(status.history or []), {"attempt": status.attempts, "stage": job.stage, **entry}]
        if outcome.ok:
            status.state, status.error = STAGES[job.stage].after, None
            self.run_dir.write_status(status)
            new_steps = job.settings.max_train_steps - self.start_step.get(job.subject.subject_id, 0)
            self.on_event(f"{job.stage}_attempt", {"outcome": outcome, "new_steps": new_steps})
            job.stages, job.tries = job.stages[1:], 0
            if job.stages:
                self.queue.append(job)
            else:
                self.progress.finished(ok=True)
            return
        self.on_event(f"{job.stage}_attempt", {"outcome": outcome, "new_steps": 0})
        packed_oom = outcome.oom and outcome.pack_size > 1
        if packed_oom or (outcome.worker_died and self._progress(job) > job.progress_at_submit):
            # A pack too big for the GPU is not the subject's fault; nor is a worker that died after the subject
            # made progress (a preempted node, a killed process). Neither counts against max_attempts.
            job.tries -= 1
        if outcome.retryable and job.tries < self.max_attempts:
            if outcome.oom and job.stage == "train" and not packed_oom:
                job.settings = oom_adjusted(job.settings)
            # Back to the state before this stage: a retried generation keeps its subject's "trained" state.
            status.state, status.error = STAGES[job.stage].before, outcome.error
            self.run_dir.write_status(status)
            self.queue.append(job)
            return
        self._fail(job, outcome.error)

    def _fail(self, job: SubjectJob, reason: str) -> None:
        job.status.state, job.status.error = FAILED, reason
        self.run_dir.write_status(job.status)
        self.progress.finished(ok=False)

    # -- the loop ------------------------------------------------------------------------------------------------

    def _tick(self) -> None:
        slots_used = sum(len(pack) for pack in self.packs.values())  # a data-parallel subject: one slot per rank
        training = len({sid for pack in self.packs.values() for sid in pack})
        generating = sum(len(p) for _, kind, p in self.in_flight.values() if kind == "generate")
        self.progress.set_running(training + generating)
        waiting = len(self.queue) + sum(len(jobs) for jobs in self.waiting.values())
        self.on_event("tick", {"queued": waiting, "running": training + generating, "workers": len(self.identities),
                               "pack_slots_used": slots_used, "pack_slots_total": sum(self.capacity.values()),
                               "counts": summarize(self.plan.statuses)})  # fmt: skip

    def run(self) -> dict[str, int]:
        """Run the plan to completion; returns counts of subjects by state."""
        self._enqueue_plan()
        work = len(self.queue) + sum(len(v) for v in self.waiting.values())
        jobs = [*self.queue, *(job for waiting in self.waiting.values() for job in waiting)]
        widest = [j.settings.data_parallel for j in jobs if isinstance(j, SubjectJob) and j.stage == "train"]
        ranks = max(widest, default=1)  # a data-parallel subject needs that many workers, even alone
        for _ in range(min(self.options.num_workers, max(work, ranks))):
            self._start_worker()
        with self.progress:
            while self.queue or self.in_flight or any(self.packs.values()):
                self._dispatch()
                done, _ = ray.wait([*self.in_flight, *self.starting], num_returns=1, timeout=1.0)
                for ref in done:
                    if ref in self.starting:
                        self._started(ref)
                    else:
                        self._returned(ref)
                self._end_stuck_ranks()
                self._tick()
        for actor in [*self.idle, *self.starting.values()]:
            ray.kill(actor, no_restart=True)
        self.identities.clear()
        self.packs.clear()
        self.capacity.clear()
        self.on_event("tick", {"queued": 0, "running": 0, "workers": 0, "pack_slots_used": 0, "pack_slots_total": 0,
                               "counts": summarize(self.plan.statuses)})  # fmt: skip
        return summarize(self.plan.statuses)
