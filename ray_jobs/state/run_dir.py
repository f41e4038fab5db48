"""The run directory, the single source of truth of a run: `run.json` and each subject's `status.json`.

Only the driver writes here (workers write checkpoints, weights and images), so state changes never race. Every
write is atomic (see engine.storage), and everything can be read back without Ray: `dreamfleet status RUN`.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from engine import storage
from engine.diffusion.subject import TRAIN_LOG
from engine.settings import EVAL_SETTINGS, Settings
from ray_jobs.state.lease import Lease
from ray_jobs.state.states import PENDING, STATES, TRAINED_STATES

# Settings that may differ between invocations on the same RUN without changing what a subject is.
# How a run goes, not what it makes: a rerun may change them freely.
OPERATIONAL_SETTINGS = frozenset({"max_attempts", "pack_subjects", "compile_unet", "lease_ttl"}) | EVAL_SETTINGS
# The run directory's files (SPEC: "Run directory"); a subject's own folder holds what engine.diffusion.subject names.
RUN_JSON = "run.json"
SUBJECTS = "subjects"
STATUS = "status.json"
CLASS_IMAGES = "class_images"
REJECTED_ROWS = "rejected_rows.json"
GENERATIONS = "generations.parquet"  # the run's table, and each subject's own rows in its folder
MODERATION = "moderation.parquet"  # a pass output: a folder of part files
EVALUATION = "evaluation.parquet"  # a pass output: a folder of part files
CURATION = "curation.parquet"  # one row per instance photo, when `curate` is on
REPORT = "report.html"
GATE = "gate"  # the quality gate's retrain rounds (RUN/gate/attempt-<k>/), and the replaced first attempts
STATUS_READ_THREADS = 32  # reading statuses is storage round trips; overlap them on object stores


TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}$")  # what engine.storage's atomic writes leave if killed mid-write


class NotARunError(ValueError):
    """The URI holds no run.json: not a dreamfleet run directory (or not one yet)."""

    def __init__(self, uri: str):
        super().__init__(f"{uri}: no {RUN_JSON}; not a dreamfleet run directory")


class RunConflictError(ValueError):
    """RUN cannot be used: it belongs to another manifest or settings, or a link in it leads outside it."""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("dreamfleet", "torch", "diffusers", "transformers", "peft", "ray", "pyarrow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def subject_dir(run: str, subject_id: str) -> str:
    return storage.join(run, SUBJECTS, subject_id)


@dataclass
class SubjectStatus:
    subject_id: str
    state: str = PENDING  # one of ray_jobs/state/states.py
    attempts: int = 0
    error: str | None = None
    history: list[dict[str, Any]] | None = None  # one entry per attempt: outcome, error, resumed_from, steps run
    # What the subject's input costs it without failing it: a prompt its base's text encoder cuts, and by how much
    warnings: list[str] | None = None
    worker: dict[str, Any] | None = None  # pid, node and GPU ids of the worker of the latest attempt
    # The evaluation pass's per-subject means (ray_jobs/evaluate.py): images, dino, clip_i, clip_t, pres, ...
    evaluation: dict[str, Any] | None = None
    # The quality gate's record (ray_jobs/gate.py): bars, every attempt's params and scores, which one is kept
    gate: dict[str, Any] | None = None
    updated_at: str | None = None

    @property
    def is_trained(self) -> bool:
        """Trained, even if a later stage (generation) failed: its weights are in RUN and need no retraining."""
        if self.state in TRAINED_STATES:
            return True
        return any(h.get("stage") == "train" and h.get("ok") for h in self.history or [])

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "history": self.history or []}


class RunDirectory:
    def __init__(self, uri: str, lease: Lease | None = None):
        """`lease`: the driver's lease on RUN; run.json and every status are written only while it holds it."""
        self.uri = uri.rstrip("/")
        self.lease = lease

    def _write_json(self, uri: str, value: Any) -> None:
        if self.lease is not None:
            self.lease.check()  # LeaseLost: another driver has taken RUN over, so this one must not write
        storage.write_json(uri, value)

    @property
    def run_json(self) -> str:
        return storage.join(self.uri, RUN_JSON)

    @property
    def class_images(self) -> str:
        return storage.join(self.uri, CLASS_IMAGES)

    @property
    def generations(self) -> str:
        return storage.join(self.uri, GENERATIONS)

    @property
    def moderation(self) -> str:
        return storage.join(self.uri, MODERATION)

    @property
    def evaluation(self) -> str:
        return storage.join(self.uri, EVALUATION)

    @property
    def curation(self) -> str:
        return storage.join(self.uri, CURATION)

    @property
    def report(self) -> str:
        return storage.join(self.uri, REPORT)

    def train_log(self, subject_id: str) -> str:
        return storage.join(subject_dir(self.uri, subject_id), TRAIN_LOG)

    def read_run(self) -> dict[str, Any] | None:
        return storage.read_json(self.run_json) if storage.exists(self.run_json) else None

    def require_run(self) -> dict[str, Any]:
        """run.json's record; NotARunError where there is none."""
        record = self.read_run()
        if record is None:
            raise NotARunError(self.uri)
        return record

    def start(
        self,
        *,
        command: str,
        manifest_uri: str,
        manifest_fingerprint: str,
        settings: Settings,
        base_model: str,
        base_model_path: str,
        extend: bool,
    ) -> dict[str, Any]:
        """Create run.json, or check that this invocation matches the one that created it, and record it."""
        record = self.read_run()
        invocation = {"command": command, "manifest": manifest_uri, "manifest_fingerprint": manifest_fingerprint,
                      "started_at": now(), "ended_at": None}  # fmt: skip
        if record is None:
            record = {
                "manifest": manifest_uri,
                "manifest_fingerprint": manifest_fingerprint,
                "settings": settings.model_dump(),
                "base_model": base_model,
                "base_model_path": base_model_path,
                "versions": versions(),
                "started_at": invocation["started_at"],
                "ended_at": None,
                "invocations": [],
            }
        elif not extend:
            self._check_compatible(record, manifest_fingerprint, settings, base_model)
        else:
            record["settings"] = settings.model_dump()
            record["manifest_fingerprint"] = manifest_fingerprint
        record["invocations"].append(invocation)
        self._write_json(self.run_json, record)
        return record

    def _check_compatible(self, record: dict, fingerprint: str, settings: Settings, base_model: str) -> None:
        if record["manifest_fingerprint"] != fingerprint:
            raise RunConflictError(
                f"{self.uri} was started with another manifest ({record['manifest']}); "
                "use a new --out, or --extend to add this manifest's subjects to the run"
            )
        if record["base_model"] != base_model:
            raise RunConflictError(f"{self.uri} was started with base model {record['base_model']!r}, not {base_model!r}")
        # A setting added in a later version is absent from older records: it had its default then.
        old = {k: f.default for k, f in Settings.model_fields.items()} | record["settings"]
        new = settings.model_dump()
        changed = sorted(k for k in set(old) | set(new) if k not in OPERATIONAL_SETTINGS and old.get(k) != new.get(k))
        if changed:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise RunConflictError(f"{self.uri} was started with other settings ({details}); use --extend to accept them")

    def check_and_clean(self) -> list[str]:
        """Before the fleet starts and after it ends (never while a worker writes): refuse a local RUN with a link
        that leads outside it, so no write can land elsewhere, and remove the temporaries of writes that were
        killed midway. Object stores have neither links nor temporaries (each write is one PUT). Returns what it
        removed."""
        if not storage.is_local(self.uri):
            return []
        root = os.path.realpath(storage.filesystem(self.uri)[1])
        removed, folders = [], [root] if os.path.isdir(root) else []
        while folders:  # scandir's entries know their type without another system call per file
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if os.path.commonpath([root, target]) != root:
                            raise RunConflictError(f"{entry.path} is a link to {target}, outside the run directory "
                                                   f"{root}; remove it (nothing is ever written outside RUN)")  # fmt: skip
                    elif entry.is_dir():
                        folders.append(entry.path)
                    elif TEMPORARY.search(entry.name):
                        os.remove(entry.path)
                        removed.append(entry.path)
        return removed

    def finish(self, summary: dict[str, int]) -> None:
        record = self.read_run()
        record["ended_at"] = record["invocations"][-1]["ended_at"] = now()
        record["invocations"][-1]["summary"] = summary
        self._write_json(self.run_json, record)

    def status_uri(self, subject_id: str) -> str:
        return storage.join(subject_dir(self.uri, subject_id), STATUS)

    def read_status(self, subject_id: str) -> SubjectStatus | None:
        uri = self.status_uri(subject_id)
        if not storage.exists(uri):
            return None
        return SubjectStatus(**storage.read_json(uri))

    def write_status(self, status: SubjectStatus) -> None:
        status.updated_at = now()
        self._write_json(self.status_uri(status.subject_id), status.to_json())

    def read_statuses(self, subject_ids: list[str] | None = None) -> dict[str, SubjectStatus]:
        """Statuses of `subject_ids` (default: every subject folder in RUN) that exist."""
        if subject_ids is None:
            subject_ids = storage.listdir(storage.join(self.uri, SUBJECTS))
        with ThreadPoolExecutor(STATUS_READ_THREADS) as pool:
            found = pool.map(self.read_status, subject_ids)
        return {s.subject_id: s for s in found if s is not None}

    @property
    def rejected_rows_uri(self) -> str:
        return storage.join(self.uri, REJECTED_ROWS)

    def write_rejected_rows(self, rows: list[dict[str, Any]]) -> None:
        """Manifest rows that could not become subjects at all (e.g. an invalid subject_id): they have no folder."""
        self._write_json(self.rejected_rows_uri, rows)

    def read_rejected_rows(self) -> list[dict[str, Any]]:
        return storage.read_json(self.rejected_rows_uri) if storage.exists(self.rejected_rows_uri) else []


def summarize(statuses: dict[str, SubjectStatus]) -> dict[str, int]:
    counts = Counter(s.state for s in statuses.values())
    return {state: counts.get(state, 0) for state in STATES}
