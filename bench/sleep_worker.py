"""A stand-in for ray_jobs.fleet.worker.SubjectWorker that sleeps instead of training, for the scheduling benchmark.

The same methods (identity, make_class_set, train, generate), the same call protocol and outcome dicts, and no
torch: what is left of a fleet run is the scheduler, Ray and the run directory.

Training is packed as the real worker packs it: a resident pack lives in the actor between calls, each `train` call
admits subjects into its free slots and returns as soon as at least one resident ends (or after REFILL_SECONDS while
slots are free). Each subject has a fixed amount of work (`work_seconds`), and a pack of K trains its residents
concurrently at the speed of one: the GPU ideal, where K subjects in one UNet batch cost no more than one. So a call
sleeps until the resident with the least work left is done, and every resident's work shrinks by that sleep. A
`generate` call renders its subjects together the same way: it sleeps for the largest of their work seconds.

Durations come from the environment the benchmark gives every actor (Ray runtime_env env_vars):
SLEEP_WORK_SECONDS (mean seconds per subject), SLEEP_JITTER (each duration is uniform in mean·(1 ± jitter), fixed
per subject id), SLEEP_CLASS_SET_SECONDS, SLEEP_INIT_SECONDS (the stand-in for loading the base model) and
SLEEP_TIMELINE_DIR, where each actor appends one line per call that did work:
"<kind> <names> <start> <end>" (Unix seconds); names is the class prompt of a class set, and for train and generate
the comma-joined ids of the subjects that call ended ("-" when none did).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from engine.diffusion.subject import Subject, stable_seed
from engine.settings import Settings
from ray_jobs.fleet.outcome import ClassSetOutcome, Outcome, TrainCall

# As ray_jobs.fleet.worker.REFILL_SECONDS (not imported from there: that module loads torch, which the stand-in leaves out).
REFILL_SECONDS = 5.0
ENDED = 1e-9  # work left below this is done (float rounding of the subtractions)


def work_seconds(subject_id: str, mean: float, jitter: float) -> float:
    """The fixed work of one subject: uniform in mean·(1 ± jitter), drawn from its id alone."""
    uniform = stable_seed(subject_id) / 2**63
    return mean * (1 + jitter * (2 * uniform - 1))


@dataclass
class Resident:
    """A subject in the pack: its work left, since when it is resident, and who trained beside it."""

    steps: int
    work: float
    left: float
    began: float
    pack: str
    mates: set[str] = field(default_factory=set)


class SleepWorker:
    def __init__(self, base_model: str, cache_dir: str | None = None, cpu_threads: int = 1,
                 mixed_precision: str | None = None):  # fmt: skip
        self.mean = float(os.environ["SLEEP_WORK_SECONDS"])
        self.jitter = float(os.environ.get("SLEEP_JITTER", "0"))
        self.class_set_seconds = float(os.environ.get("SLEEP_CLASS_SET_SECONDS", self.mean))
        time.sleep(float(os.environ.get("SLEEP_INIT_SECONDS", "0")))
        folder = os.environ.get("SLEEP_TIMELINE_DIR")
        # Line-buffered: the scheduler kills its actors at the end, and a killed process flushes nothing.
        self.timeline = open(os.path.join(folder, f"{os.getpid()}.txt"), "a", buffering=1) if folder else None
        self.residents: dict[str, Resident] = {}
        self.capacity = 0
        self.packs = 0  # packs started by this actor, for the pack ids

    @functools.cached_property
    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()[:12]

    def identity(self) -> dict[str, Any]:
        import ray

        # torch_loaded: the benchmark checks that the stand-in really left torch out of the actors.
        return {"pid": os.getpid(), "node": self.node, "gpu_ids": ray.get_gpu_ids(),
                "torch_loaded": "torch" in sys.modules}  # fmt: skip

    def make_class_set(self, class_root: str, class_prompt: str, settings: Settings) -> ClassSetOutcome:
        began, start = time.perf_counter(), time.time()
        time.sleep(self.class_set_seconds)
        self._log("class_set", [class_prompt.replace(" ", "_")], start)
        uris = [f"{class_root}/{stable_seed(class_prompt):x}/{i:05d}.png" for i in range(settings.num_class_images)]
        return ClassSetOutcome(True, uris, len(uris), time.perf_counter() - began)

    def train(
        self, run: str, admit: list[tuple[Subject, Settings, list[str] | None]], capacity: int
    ) -> TrainCall:
        """Admit `admit` into the pack's free slots (a new pack of `capacity` slots if there is none), then sleep
        until its first resident is done, or for REFILL_SECONDS if that is sooner and slots are free."""
        if admit and not self.residents:
            self.packs, self.capacity = self.packs + 1, capacity
        pack = f"{self.node}-{os.getpid()}-{self.packs}"  # as the real worker names its packs
        for subject, settings, _ in admit:
            work = work_seconds(subject.subject_id, self.mean, self.jitter)
            resident = Resident(settings.max_train_steps, work, work, time.perf_counter(), pack)
            self.residents[subject.subject_id] = resident
        if not self.residents:
            return TrainCall([], [])
        for resident in self.residents.values():
            resident.mates.update(self.residents)
        sleep = min(r.left for r in self.residents.values())
        if len(self.residents) < self.capacity:
            sleep = min(sleep, REFILL_SECONDS)
        start = time.time()
        time.sleep(sleep)
        for resident in self.residents.values():
            resident.left -= sleep
        ended = [self._ended(sid) for sid in [s for s, r in self.residents.items() if r.left < ENDED]]
        self._log("train", [e.subject_id for e in ended], start)
        return TrainCall(ended, sorted(self.residents))

    def _ended(self, sid: str) -> Outcome:
        resident = self.residents.pop(sid)
        resident.mates.discard(sid)
        return Outcome(
            sid, ok=True, steps_run=resident.steps,
            # the real worker returns one time per step: the same payload
            step_seconds=[resident.work / resident.steps] * resident.steps, final_loss=0.1,
            seconds=time.perf_counter() - resident.began, pack=resident.pack, pack_mates=sorted(resident.mates),
        )  # fmt: skip

    def generate(self, run: str, jobs: list[tuple[Subject, Settings]]) -> list[Outcome]:
        """Render the subjects together: one sleep, the largest of their work seconds."""
        began, start = time.perf_counter(), time.time()
        time.sleep(max(work_seconds(s.subject_id, self.mean, self.jitter) for s, _ in jobs))
        self._log("generate", [s.subject_id for s, _ in jobs], start)
        outcomes = []
        for subject, settings in jobs:
            images = len(subject.prompts) * settings.num_images_per_prompt
            outcomes.append(Outcome(subject.subject_id, ok=True, images=images, images_generated=images,
                                    seconds=time.perf_counter() - began))  # fmt: skip
        return outcomes

    def _log(self, kind: str, names: list[str], start: float) -> None:
        if self.timeline:
            self.timeline.write(f"{kind} {','.join(names) or '-'} {start:.6f} {time.time():.6f}\n")
