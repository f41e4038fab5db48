"""The fleet's worker: one long-lived process per GPU slot that loads the base model once and serves many subjects,
training a pack of them at once (engine/train.PackTrainer) and rendering several per UNet batch.

The pack lives in the worker between calls: each `train` call admits subjects into free slots and returns as soon
as one ends, so the scheduler refills its slot at once. Methods return outcomes (fleet/outcome.py) instead of raising,
so the scheduler can tell a subject's own failure (bad image, NaN loss, OOM) from the death of the worker process.

A data-parallel subject trains on several of these workers at once, one rank each (`train_data_parallel`): an actor
group of the fleet's own workers rather than Ray Train, whose TorchTrainer would start N new actors per subject,
each loading the base model again, for GPUs the fleet's workers already hold, and keep checkpoints of its own.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import storage
from engine.diffusion import data_parallel
from engine.diffusion.base_model import frozen_weights_dtype, load_base_model, resolve_base_model
from engine.diffusion.checkpoints import CheckpointError
from engine.diffusion.class_images import ClassImageCache
from engine.diffusion.generation import RenderJob, render_pack
from engine.diffusion.subject import IMAGES, WEIGHTS, Subject
from engine.diffusion.train import PackTrainer, StepRecord
from engine.diffusion.weights import attach_lora_pack, load_subject_weights
from engine.hub import default_device
from engine.media.images import ImageError
from engine.settings import Settings, SettingsError
from engine.tracking import SubjectTracker, TrackingGroup
from ray_jobs.fleet.outcome import ClassSetOutcome, Outcome, TrainCall
from ray_jobs.state.generations import write_subject_generations
from ray_jobs.state.run_dir import subject_dir

# Failures that come from the subject's own input: trying again would fail the same way.
PERMANENT_ERRORS = (ImageError, CheckpointError, SettingsError)


def _peak_gpu_memory() -> int:
    """Peak GPU memory of this process since the last call (0 without a GPU), then reset for the next attempt."""
    if not torch.cuda.is_available():
        return 0
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


def _failure(subject_id: str, err: BaseException, **extra: Any) -> Outcome:
    return Outcome.failure(
        subject_id, err, retryable=not isinstance(err, PERMANENT_ERRORS), oom=isinstance(err, torch.cuda.OutOfMemoryError),
        peer_failed=isinstance(err, data_parallel.PeerFailedError), peak_gpu_memory_bytes=_peak_gpu_memory(), **extra,
    )  # fmt: skip


# With free slots, a train call returns at least this often, so the scheduler can fill them with subjects that became
# ready in the meantime (their class images finished, another worker gave them up).
REFILL_SECONDS = 5.0


@dataclass
class Residency:
    """A subject's stay in this worker's pack: since when, its step times, and who trained beside it."""

    began: float
    pack: str
    resumed_from: int | None = None
    step_seconds: list[float] = field(default_factory=list)
    mates: set[str] = field(default_factory=set)


class SubjectWorker:
    def __init__(self, base_model: str, cache_dir: str | None = None, cpu_threads: int = 1,
                 mixed_precision: str | None = None, tracking: TrackingGroup | None = None):  # fmt: skip
        device = default_device()
        if device.type == "cpu":
            # Several workers share the machine's cores; one thread each avoids oversubscribing them.
            torch.set_num_threads(cpu_threads)
        dtype = frozen_weights_dtype(Settings(mixed_precision=mixed_precision).effective_mixed_precision(device.type))
        self.base = load_base_model(resolve_base_model(base_model, cache_dir), device, dtype)
        self.trainer: PackTrainer | None = None
        self.packs = 0  # packs started by this worker, for the pack ids in subjects' histories
        self.residents: dict[str, Residency] = {}
        self.tracking = tracking  # the RUN's experiment trackers (engine/tracking.py); None: none
        self.trackers: dict[str, SubjectTracker] = {}  # of the residents this process tracks

    def identity(self) -> dict[str, Any]:
        """Where this worker runs: its process and the GPU ids Ray assigned it (shared ids mean shared GPUs)."""
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()[:12], "gpu_ids": ray.get_gpu_ids()}

    def _idle_model(self) -> None:
        """The base model bare again, for class images or generation (the scheduler sends them only to a worker
        whose pack is empty)."""
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None

    def _compile(self, settings: Settings) -> None:
        if settings.compile_unet:
            self.base.compile_unet()

    def make_class_set(self, class_root: str, class_prompt: str, settings: Settings) -> ClassSetOutcome:
        began = time.perf_counter()
        try:
            self._idle_model()
            result = ClassImageCache(class_root).ensure(self.base, class_prompt, settings)
        except Exception as err:
            return ClassSetOutcome(False, error=f"{type(err).__name__}: {err}", retryable=not isinstance(err, PERMANENT_ERRORS))
        return ClassSetOutcome(True, result.uris, result.generated, time.perf_counter() - began)

    # -- training: a pack of subjects that changes as they come and go ------------------------------------------

    def train(
        self, run: str, admit: list[tuple[Subject, Settings, list[str] | None]], capacity: int
    ) -> TrainCall:
        """Admit `admit` into free slots of the resident pack (a new pack of `capacity` slots if there is none),
        then train until at least one resident subject ends, or, with slots free, for REFILL_SECONDS."""
        ended: list[Outcome] = []
        if admit and self.trainer is None:
            try:
                self._compile(admit[0][1])
                self.trainer = PackTrainer(self.base, admit[0][1], capacity)
            except Exception as err:  # the pack's shape does not fit the base (a LoRA target that is not Linear): the
                # subjects of that shape fail, and the worker stays for the others
                return TrainCall([_failure(s.subject_id, err) for s, _, _ in admit], sorted(self.residents))
            self.packs += 1
        for subject, settings, class_uris in admit:
            ended += self._admit(run, subject, settings, class_uris)
        self._note_mates()
        began = time.monotonic()
        while self.trainer is not None and self.trainer.members and not ended:
            try:
                finished = self.trainer.step()
            except Exception as err:  # the pack's shared pass failed (e.g. out of memory): every resident ends
                size = len(self.trainer.members)
                ended += [self._ended(_failure(m.subject.subject_id, err, pack_size=size)) for m in self.trainer.members.values()]
                self._idle_model()
                if isinstance(err, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                break
            for e in finished:
                sid = e.subject.subject_id
                ended.append(self._ended(_failure(sid, e.error) if e.error is not None else Outcome(
                    sid, ok=True, final_loss=e.result.losses[-1], peak_gpu_memory_bytes=_peak_gpu_memory(),
                )))  # fmt: skip
            if self.trainer.free_slots and time.monotonic() - began > REFILL_SECONDS:
                break
        if self.trainer is not None and not self.trainer.members:
            self._idle_model()
        return TrainCall(ended, sorted(self.residents))

    def _admit(self, run: str, subject: Subject, settings: Settings, class_uris: list[str] | None) -> list[Outcome]:
        sid = subject.subject_id
        node = self.identity()["node"]
        residency = Residency(time.perf_counter(), f"{node}-{os.getpid()}-{self.packs}")
        self.residents[sid] = residency
        try:
            member = self.trainer.admit(
                subject, settings, subject_dir(run, sid), class_uris,
                on_step=lambda record: self._stepped(sid, record),
            )  # fmt: skip
        except Exception as err:
            return [self._ended(_failure(sid, err))]
        residency.resumed_from = member.resumed_from
        if self.tracking is not None and self.trainer.rank == 0:  # data-parallel: the primary process tracks
            self.trackers[sid] = SubjectTracker(self.tracking, sid, settings, subject_dir(run, sid), member.step)
        return []

    def _stepped(self, sid: str, record: StepRecord) -> None:
        self.residents[sid].step_seconds.append(record.seconds)
        if sid in self.trackers:
            self.trackers[sid].log_step(record)

    def _note_mates(self) -> None:
        """Everyone now in the pack is everyone else's pack mate."""
        if self.trainer is not None:
            ids = {m.subject.subject_id for m in self.trainer.members.values()}
            for sid in ids:
                self.residents[sid].mates.update(ids)

    def _ended(self, outcome: Outcome) -> Outcome:
        """`outcome` with what the subject's stay in the pack adds: steps, times, the pack and its mates."""
        sid = outcome.subject_id
        residency = self.residents.pop(sid)
        residency.mates.discard(sid)
        tracker = self.trackers.pop(sid, None)
        tracker_errors = tracker.close(ok=outcome.ok) if tracker is not None else None
        return outcome.replace(
            resumed_from=residency.resumed_from, steps_run=len(residency.step_seconds),
            step_seconds=residency.step_seconds, seconds=time.perf_counter() - residency.began, pack=residency.pack,
            pack_mates=sorted(residency.mates), tracker_errors=tracker_errors or None,
        )  # fmt: skip

    # -- one subject trained by several workers (data_parallel > 1) ---------------------------------------------

    def rendezvous(self) -> dict[str, Any]:
        """As rank 0 of a data-parallel group: where the group meets, this node's IP and a port free on it."""
        import ray

        return {"address": ray.util.get_node_ip_address(), "port": data_parallel.free_port()}

    def train_data_parallel(
        self, run: str, admit: tuple[Subject, Settings, list[str] | None], rank: int, rendezvous: dict[str, Any]
    ) -> Outcome:
        """Rank `rank` of the settings' `data_parallel` workers training one subject with DDP: join the group at
        `rendezvous`, train the subject to its end as a pack of one (rank 0 alone writes its checkpoints and weights),
        leave the group. Returns this rank's outcome (the scheduler combines the ranks'); idle again afterwards."""
        subject, settings, _ = admit
        try:
            self._idle_model()
            address, port = rendezvous["address"], rendezvous["port"]
            data_parallel.join(rank, settings.data_parallel, address, port, self.base.device)
            ended = self.train(run, [admit], capacity=1).ended
        except Exception as err:  # could not join, or the pack could not even be made: this rank's own outcome
            self._idle_model()
            ended = [_failure(subject.subject_id, err)]
        finally:
            data_parallel.leave()
        return ended[0].replace(rank=rank)

    # -- generation: several subjects per UNet batch ------------------------------------------------------------

    def generate(self, run: str, jobs: list[tuple[Subject, Settings]]) -> list[Outcome]:
        """Render the subjects' prompts together, each image through its own subject's weights; one outcome each."""
        began = time.perf_counter()
        outcomes: dict[str, Outcome] = {}
        render: list[RenderJob] = []
        before: dict[str, int] = {}
        try:
            self._idle_model()
            self._compile(jobs[0][1])
            lora = jobs[0][1].mode == "lora"
            if lora:
                attach_lora_pack(self.base, jobs[0][1], capacity=len(jobs))
            for slot, (subject, settings) in enumerate(jobs):
                folder = subject_dir(run, subject.subject_id)
                try:
                    before[subject.subject_id] = len(storage.listdir(storage.join(folder, IMAGES)))
                    if subject.prompts:
                        load_subject_weights(self.base, settings, storage.join(folder, WEIGHTS), slot=slot)
                except Exception as err:  # this subject's weights: it fails alone
                    outcomes[subject.subject_id] = _failure(subject.subject_id, err)
                    continue
                render.append(RenderJob(subject, settings, storage.join(folder, IMAGES), slot))
            rows = render_pack(self.base, render) if render else {}
            tracker_errors: dict[str, list[str]] = {}
            for job in render:
                sid, folder = job.subject.subject_id, subject_dir(run, job.subject.subject_id)
                write_subject_generations(folder, rows[sid])
                if self.tracking is not None:  # the images, with their prompts, to the subject's tracked runs
                    tracker = SubjectTracker(self.tracking, sid, job.settings, folder)
                    tracker.log_images(rows[sid])
                    tracker_errors[sid] = tracker.close()
        except Exception as err:
            return [outcomes.get(s.subject_id) or _failure(s.subject_id, err) for s, _ in jobs]
        finally:
            self.base.reset()
        seconds, peak = time.perf_counter() - began, _peak_gpu_memory()
        for job in render:
            sid = job.subject.subject_id
            images = len(rows[sid])
            outcomes[sid] = Outcome(sid, ok=True, images=images, images_generated=images - before[sid], seconds=seconds,
                                    peak_gpu_memory_bytes=peak, tracker_errors=tracker_errors.get(sid) or None)  # fmt: skip
        return [outcomes[s.subject_id] for s, _ in jobs]
