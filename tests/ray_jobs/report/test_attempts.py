"""A subject's history table (ray_jobs/report/attempts.py): each entry read through its typed outcome, the attempts
status.json counts without one, retries per stage."""

from __future__ import annotations

from ray_jobs.fleet.outcome import Outcome
from ray_jobs.report.attempts import PackStay, attempt_summary
from ray_jobs.state.run_dir import SubjectStatus


def test_an_entry_is_read_through_its_outcome_and_one_without_ok_is_a_failure():
    status = SubjectStatus("s", "failed", 3, "boom", history=[
        {"attempt": 1, "stage": "train", "ok": True, "steps_run": 0, "seconds": "slow", "pack": "p", "pack_mates": None,
         "written_by_a_later_version": 1},
        {"attempt": 3, "stage": "generate", "error": "boom"},  # no `ok`: cut short, or written by hand
    ])  # fmt: skip
    summary = attempt_summary(status)
    assert [(a.number, a.stage, a.result) for a in summary.rows] == [
        (1, "train", "ok"), (2, "generate", "interrupted"), (3, "generate", "failed")]  # fmt: skip
    trained, interrupted, failed = summary.rows
    assert trained.outcome == Outcome("s", ok=True, steps_run=0, seconds="slow", pack="p")
    assert trained.facts == ["0 steps"] and trained.pack == PackStay("p", [])  # a non-number of seconds is left out
    assert interrupted.outcome is None and interrupted.facts == ["no outcome recorded"] and interrupted.pack is None
    assert failed.outcome.error == "boom" and not failed.ok
    assert (summary.retries, summary.failed_stage, summary.failed_after_text) == (1, "generate", "2 generation attempts")
