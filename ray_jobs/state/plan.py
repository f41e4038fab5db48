"""Planning a fleet run, with no Ray in it: which class-image sets to make, which subjects still need training and
which still need their images generated.

The plan is read from the manifest, the settings and the run directory alone, so it can be unit-tested and so a
rerun on the same RUN does only what is left (Ray Data's lesson: what to do, apart from how it runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.diffusion.class_images import class_set_key
from engine.diffusion.subject import SUBJECT_ID_PATTERN, Subject
from engine.settings import Settings
from ray_jobs.state.manifest import RowError
from ray_jobs.state.run_dir import SubjectStatus
from ray_jobs.state.states import DONE, STAGES


@dataclass(frozen=True)
class ClassSetJob:
    key: str
    class_prompt: str
    settings: Settings


@dataclass
class SubjectJob:
    subject: Subject
    settings: Settings
    class_set: str | None  # key of the class-image set it needs, None without prior preservation
    status: SubjectStatus
    stages: tuple[str, ...]  # what is left to do for it, in order: ("train", "generate"), ("generate",), ...
    tries: int = 0  # attempts at the current stage in this invocation; status.attempts counts them all
    progress_at_submit: int = 0  # checkpoint step (train) or images on disk (generate) when the attempt began

    @property
    def stage(self) -> str:
        return self.stages[0]


@dataclass
class FleetPlan:
    class_sets: list[ClassSetJob]
    subjects: list[SubjectJob]
    finished: list[str]  # subjects with nothing left to do in the asked stages
    not_trained: list[str]  # subjects that must be trained before they can be generated
    bad_rows: list[RowError]  # rows of the manifest that cannot be trained, with their reasons
    statuses: dict[str, SubjectStatus] = field(default_factory=dict)  # every subject's status after planning


def subject_settings(subject: Subject, settings: Settings) -> Settings:
    return settings.with_overrides(subject.params, source=f"subject {subject.subject_id!r} params")


def plan_fleet(
    subjects: list[Subject],
    bad_rows: list[RowError],
    existing: dict[str, SubjectStatus],
    settings: Settings,
    base_fingerprint: str,
    stages: tuple[str, ...] = ("train",),
) -> FleetPlan:
    """Everything left to do for `subjects` in `stages`, given the statuses `existing` in the run directory.

    A subject already trained is not trained again; one that failed in an earlier invocation is tried again with a
    fresh budget of attempts (its history is kept), since a rerun is how a user says "try again". Generation only
    runs on trained subjects: asked alone, it reports the untrained ones instead.
    """
    class_sets: dict[str, ClassSetJob] = {}
    jobs, finished, not_trained = [], [], []
    statuses = dict(existing)
    for subject in subjects:
        status = existing.get(subject.subject_id) or SubjectStatus(subject.subject_id)
        statuses[subject.subject_id] = status
        trained = status.is_trained
        todo = tuple(
            stage for stage in stages if stage in STAGES
            if (stage == "train" and not trained) or (stage == "generate" and status.state != DONE)
        )  # fmt: skip
        if not todo:
            finished.append(subject.subject_id)
            continue
        if todo[0] == "generate" and not trained:
            not_trained.append(subject.subject_id)
            continue
        own = subject_settings(subject, settings)
        key = None
        if todo[0] == "train" and own.with_prior_preservation:
            key = class_set_key(base_fingerprint, subject.class_prompt, own)
            class_sets.setdefault(key, ClassSetJob(key, subject.class_prompt, own))
        jobs.append(SubjectJob(subject, own, key, status, todo))
    return FleetPlan(list(class_sets.values()), jobs, finished, not_trained, bad_rows, statuses)


def row_has_own_folder(error: RowError, good_ids: set[str], bad_ids: list[str | None]) -> bool:
    """A bad row gets a failed status.json only if its id is a valid name no other row uses."""
    sid = error.subject_id
    return bool(sid) and SUBJECT_ID_PATTERN.fullmatch(sid) is not None and sid not in good_ids and bad_ids.count(sid) == 1
