"""A subject's attempts as its report card's history table shows them: each recorded attempt (its outcome, read
through fleet.outcome.Outcome), those status.json counts without one, its retries and the pack each training ran in."""

from __future__ import annotations

from dataclasses import dataclass

from ray_jobs.fleet.outcome import Outcome
from ray_jobs.state.run_dir import SubjectStatus
from ray_jobs.state.states import FAILED, RUNNING_STATES, STAGE_OF_STATE

STAGE_NAMES = {"train": "training", "generate": "generation"}
MATES_SHOWN = 6  # pack mates named in a history row; the rest are counted


@dataclass(frozen=True)
class PackStay:
    """The pack a training attempt ran in: its id and every subject that trained in it alongside at some step (mates
    come and go as slots are refilled, so there can be more of them than the pack has slots)."""

    id: str
    mates: list[str]

    @property
    def shown(self) -> list[str]:
        return self.mates[:MATES_SHOWN]

    @property
    def more(self) -> int:
        return len(self.mates) - len(self.shown)


@dataclass(frozen=True)
class Attempt:
    """A row of a subject's history table: a recorded attempt and its outcome, or one status.json counts without."""

    number: int | None
    stage: str
    result: str  # "ok", "failed", "interrupted", or "running or interrupted"
    outcome: Outcome | None = None  # None: no outcome recorded

    @property
    def ok(self) -> bool:
        return self.result == "ok"

    @property
    def facts(self) -> list[str]:
        """What the attempt did, as short phrases (steps, images, seconds)."""
        if (o := self.outcome) is None:
            return ["no outcome recorded"]
        facts = []
        if o.steps_run is not None:
            resumed = f" (resumed from step {o.resumed_from})" if o.resumed_from else ""
            facts.append(f"{o.steps_run} steps{resumed}")
        if o.images_generated is not None:
            facts.append(f"{o.images_generated} image{'s' if o.images_generated != 1 else ''}")
        if isinstance(o.seconds, int | float):  # status.json is read as it is, not checked against the types
            facts.append(f"{o.seconds:.1f} s")
        return facts

    @property
    def pack(self) -> PackStay | None:
        if self.outcome is None or not self.outcome.pack:
            return None
        return PackStay(str(self.outcome.pack), [str(m) for m in self.outcome.pack_mates or []])


@dataclass(frozen=True)
class AttemptSummary:
    """A subject's attempts counted per stage: retries are attempts after a failed (or interrupted) attempt of the
    same stage, so a subject trained and rendered first time has none, whatever status.attempts says."""

    rows: list[Attempt]
    retries: int
    failed_stage: str | None  # the stage a failed subject failed in; None if it failed before any attempt
    failed_after: int  # its attempts at that stage since the stage last succeeded

    @property
    def retries_text(self) -> str:
        return f"{self.retries} retr{'y' if self.retries == 1 else 'ies'}" if self.retries else ""

    @property
    def failed_after_text(self) -> str:
        if not self.failed_after:
            return ""
        stage = STAGE_NAMES.get(self.failed_stage or "", self.failed_stage)
        words = (str(self.failed_after), stage, "attempts" if self.failed_after != 1 else "attempt")
        return " ".join(w for w in words if w)


def attempt_summary(status: SubjectStatus) -> AttemptSummary:
    """The rows of `status`'s history, with the attempts it counts but holds no outcome of, and its retries."""
    rows: list[Attempt] = []
    expected = 1  # the scheduler numbers a subject's attempts 1, 2, ... across its stages
    for entry in status.history or []:
        number, stage = entry.get("attempt"), str(entry.get("stage") or "")
        if isinstance(number, int):
            rows += [Attempt(n, stage, "interrupted") for n in range(expected, number)]
            expected = max(expected, number + 1)
        # `attempt` and `stage` are the scheduler's, the rest the attempt's outcome; an entry without `ok` (cut short,
        # or written by hand) reads as failed, as it always has.
        outcome = Outcome.from_history(status.subject_id, {**entry, "ok": bool(entry.get("ok"))})
        rows.append(Attempt(number, stage, "ok" if outcome.ok else "failed", outcome))
    if status.state in STAGE_OF_STATE:
        for n in range(expected, status.attempts + 1):
            running = n == status.attempts and status.state in RUNNING_STATES
            result = "running or interrupted" if running else "interrupted"
            rows.append(Attempt(n, STAGE_OF_STATE[status.state], result))
    retries, last_ok = 0, {}
    for row in rows:
        if last_ok.get(row.stage) is False:  # an attempt after its stage's previous one failed
            retries += 1
        last_ok[row.stage] = row.ok
    failed_stage, failed_after = None, 0
    if status.state == FAILED and rows:
        failed_stage = rows[-1].stage
        for row in reversed([r for r in rows if r.stage == failed_stage]):
            if row.ok:
                break
            failed_after += 1
    return AttemptSummary(rows, retries, failed_stage, failed_after)
