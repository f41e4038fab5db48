"""What a worker returns to the scheduler for each attempt: an `Outcome` per subject (a `ClassSetOutcome` per class
set), read by attribute by the scheduler, the metrics and, through each subject's history in status.json, the report.

Workers return these rather than raise, so the scheduler can tell a subject's own failure (bad image, NaN loss, OOM)
from the death of the worker process (which returns nothing: the scheduler makes that outcome itself).
"""

from __future__ import annotations

import dataclasses
import traceback
from dataclasses import dataclass, field
from typing import Any

# The outcome's fields kept in the subject's history (status.json); the rest serve scheduling and metrics only.
HISTORY_FIELDS = ("ok", "error", "resumed_from", "steps_run", "images", "images_generated", "seconds", "final_loss",
                  "pack", "pack_mates", "tracker_errors", "workers")  # fmt: skip
ATTEMPT_KINDS = ("success", "oom", "worker_died", "error")  # the metrics' `outcome` label


@dataclass
class Outcome:
    """One subject's attempt at a stage, as its worker (or, for a dead worker, the scheduler) saw it end."""

    subject_id: str
    ok: bool
    error: str | None = None
    retryable: bool = True  # False: the subject's own input can never work (a bad image, a bad setting)
    oom: bool = False
    worker_died: bool = False
    peer_failed: bool = False  # data-parallel: another rank failed, not this one
    traceback: str | None = None
    peak_gpu_memory_bytes: int = 0
    seconds: float | None = None
    tracker_errors: list[str] | None = None
    # training
    resumed_from: int | None = None
    steps_run: int | None = None
    step_seconds: list[float] = field(default_factory=list)
    final_loss: float | None = None
    pack: str | None = None  # the pack's id, and every subject that trained beside it at some step
    pack_mates: list[str] | None = None
    pack_size: int = 1  # residents of the pack when its shared pass failed (an OOM of a pack halves the next one)
    # data-parallel training
    rank: int | None = None
    workers: list[dict[str, Any]] | None = None
    # generation
    images: int | None = None
    images_generated: int | None = None

    @classmethod
    def failure(cls, subject_id: str, err: BaseException, *, retryable: bool, oom: bool = False,
                peer_failed: bool = False, **extra: Any) -> Outcome:  # fmt: skip
        return cls(subject_id, ok=False, error=f"{type(err).__name__}: {err}", retryable=retryable, oom=oom,
                   peer_failed=peer_failed, traceback="".join(traceback.format_exception(err, limit=8)), **extra)  # fmt: skip

    @classmethod
    def died(cls, subject_id: str, error: str, **extra: Any) -> Outcome:
        """The worker process died during the attempt: retryable, and returned by nobody."""
        return cls(subject_id, ok=False, error=error, retryable=True, worker_died=True, **extra)

    @property
    def kind(self) -> str:
        """success, oom, worker_died or error (ATTEMPT_KINDS)."""
        return "success" if self.ok else "oom" if self.oom else "worker_died" if self.worker_died else "error"

    def replace(self, **changes: Any) -> Outcome:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_history(cls, subject_id: str, entry: dict[str, Any]) -> Outcome:
        """An attempt as its subject's history recorded it (the fields HISTORY_FIELDS keeps; older runs may lack some)."""
        return cls(subject_id, **{k: entry[k] for k in HISTORY_FIELDS if k in entry and entry[k] is not None})

    def history_entry(self) -> dict[str, Any]:
        """The fields the subject's history keeps that this attempt set; a training attempt always says where it resumed
        from (null: from the start)."""
        entry = {k: getattr(self, k) for k in HISTORY_FIELDS if k == "ok" or getattr(self, k) is not None}
        if self.steps_run is not None:
            entry["resumed_from"] = self.resumed_from
        return entry


@dataclass
class ClassSetOutcome:
    """A class-image set made (or found complete) by a worker, or why it could not be."""

    ok: bool
    uris: list[str] = field(default_factory=list)
    generated: int = 0
    seconds: float = 0.0
    error: str | None = None
    retryable: bool = True


@dataclass
class TrainCall:
    """What one `train` call of a worker returns: the subjects that ended in it, and those still in its pack."""

    ended: list[Outcome]
    residents: list[str]
