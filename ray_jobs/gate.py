"""The quality gate of `dreamfleet run`, after its evaluation: subjects under the gate train again with an adjusted
recipe (ray_jobs/state/gate.py decides which and how), are rendered, moderated and scored again, and the better
attempt is kept.

Each retrain round k is a run directory of its own, RUN/gate/attempt-<k>/, made by the same `run` machinery from a
manifest of the subjects it retrains (RUN/gate/attempt-<k>/subjects.parquet: their rows, params adjusted): so a
retrain resumes, is exactly-once and survives kills as any run does, and its weights, images, verdicts and scores
sit in that folder. Each subject's status.json in RUN gets `gate`: every attempt's params and scores, and which is
kept. A kept retrain is then put in place (ray_jobs/state/kept.py): RUN/subjects/<id> and RUN's tables hold its
results, the first attempt's move to RUN/gate/attempt-0/, and `installed` in the record commits it. A subject
whose best attempt is still under the gate ends `below_gate`; that is not a failure (the exit status is as for
`done`). A subject with a record is judged again from it, never from RUN's scores (which may be the retrain's).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from engine import storage
from engine.diffusion.subject import Subject
from engine.settings import Settings
from ray_jobs.state.gate import GATED, GateAttempt, attempt, best, gate_bars, gate_on, needs_retry, next_recipe, spreads
from ray_jobs.state.kept import archive_first_attempt, install_attempt, installable
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.plan import subject_settings
from ray_jobs.state.run_dir import GATE, RunDirectory, subject_dir
from ray_jobs.state.states import BELOW_GATE, DONE, RENDERED_STATES

# Runs train → generate → moderate → evaluate for the manifest at the first URI into the run directory at the
# second, with these settings (ray_jobs/run.py passes its own run_manifest, so this module does not import it).
RunAttempt = Callable[[str, str, Settings], None]


def attempt_dir(run_uri: str, number: int) -> str:
    return storage.join(run_uri, GATE, f"attempt-{number}")


def _absolute(uri: str, manifest_uri: str) -> str:
    """An instance image URI as the attempt's manifest must name it: relative paths resolved against the original
    manifest's folder, since the attempt's manifest lives elsewhere."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return storage.join(manifest_uri.rsplit("/", 1)[0], uri)


def manifest_row(subject: Subject, params: dict, manifest_uri: str) -> dict:
    return {
        "subject_id": subject.subject_id,
        "instance_images": [_absolute(uri, manifest_uri) for uri in subject.instance_images],
        "instance_prompt": subject.instance_prompt,
        "class_prompt": subject.class_prompt,
        "prompts": list(subject.prompts),
        "num_images_per_prompt": subject.num_images_per_prompt,
        "seed": subject.effective_seed,  # the same seed: the recipe is all that changes
        "params": json.dumps(params, sort_keys=True),
    }


def run_quality_gate(run: RunDirectory, subjects: list[Subject], manifest_uri: str, settings: Settings,
                     run_attempt: RunAttempt) -> dict[str, str]:  # fmt: skip
    """Retrain the subjects under the gate, round by round, then record every gated subject's attempts and its
    state in RUN. Returns {subject_id: state} of the subjects the gate judged under its bar at first."""
    if not gate_on(settings):
        return {}
    by_id = {s.subject_id: s for s in subjects}
    statuses = run.read_statuses(list(by_id))
    # A subject with a record went through its rounds in an earlier invocation: judged from the record (RUN's scores
    # may be its kept retrain's by now).
    records = {sid: s.gate["attempts"] for sid, s in statuses.items() if s.gate and s.gate.get("attempts")}
    # Only rendered and scored subjects can be judged; a subject with no prompts has nothing to score.
    firsts = {sid: status.evaluation for sid, status in statuses.items()
              if status.state in RENDERED_STATES and status.evaluation and sid not in records}  # fmt: skip
    run_spreads = spreads([*firsts.values(), *(attempts[0]["scores"] for attempts in records.values())])
    recorded = {sid: [attempt(a["attempt"], a["run"], a["params"], a["scores"], settings, run_spreads) for a in record]
                for sid, record in records.items()}  # fmt: skip
    history: dict[str, list[GateAttempt]] = {
        sid: [attempt(0, run.uri, by_id[sid].params, scores, settings, run_spreads)] for sid, scores in firsts.items()
    } | recorded
    judged = {sid for sid, attempts in history.items() if attempts[0].shortfall}
    for number in range(1, settings.gate_retries + 1):
        retry = {}
        for sid, attempts in history.items():
            if sid not in recorded and needs_retry(attempts, settings):
                last = attempts[-1]
                own = subject_settings(Subject(**{**by_id[sid].__dict__, "params": last.params}), settings)
                retry[sid] = next_recipe(last, own)
        if not retry:
            break
        folder = attempt_dir(run.uri, number)
        attempt_manifest = storage.join(folder, "subjects.parquet")
        write_subjects_manifest(attempt_manifest, [manifest_row(by_id[sid], params, manifest_uri)
                                                   for sid, params in sorted(retry.items())])  # fmt: skip
        print(f"quality gate: {len(retry)} subject(s) under the gate train again ({', '.join(sorted(retry))}), "
              f"round {number} of {settings.gate_retries}, in {folder}")  # fmt: skip
        run_attempt(attempt_manifest, folder, settings.with_overrides(
            {"gate_min_dino": None, "gate_min_clip_t": None, "gate_relative": None},
            source="quality gate"))  # a retrain is not gated again
        scored = RunDirectory(folder).read_statuses(sorted(retry))
        for sid, params in retry.items():
            status = scored.get(sid)
            scores = status.evaluation if status is not None and status.state in RENDERED_STATES else None
            history[sid].append(attempt(number, folder, params, scores, settings, run_spreads))
    bars = gate_bars(settings, run_spreads)
    return {sid: _record(run, sid, history[sid], bars) for sid in sorted(judged)}


def _record(run: RunDirectory, subject_id: str, attempts: list[GateAttempt], bars: dict[str, float]) -> str:
    """Write a judged subject's gate record and state into its status.json, then put a kept retrain in place (or
    finish putting it there, after a kill); its state."""
    kept = best(attempts)
    status = run.read_status(subject_id)
    if status.gate and status.gate.get("installed"):
        return status.state  # recorded and in place in an earlier invocation
    record = {
        # each gated score's bar (absolute, or from the run's spread with gate_relative); None: not gated
        "bars": {metric: bars.get(metric) for metric, _ in GATED},
        "attempts": [{**a.to_json(), "subject": subject_dir(a.run, subject_id)} for a in attempts],
        "kept": kept.attempt,
        "kept_subject": subject_dir(kept.run, subject_id),  # its weights/ and images/, until put in place
    }
    state = BELOW_GATE if kept.shortfall else DONE
    if status.gate != record or status.state != state:
        status.gate, status.state = record, state
        run.write_status(status)
    if kept.attempt == 0:
        return state
    reason = installable(run, subject_id, kept.run)
    if reason is not None:  # RUN keeps the first attempt's results; the record names where the kept one is
        print(f"warning: quality gate: {subject_id}: the kept attempt {kept.attempt} stays in {kept.run} ({reason})",
              file=sys.stderr)  # fmt: skip
        return state
    archive = archive_first_attempt(run, subject_id)
    install_attempt(run, subject_id, kept.run)
    record["attempts"][0]["subject"] = archive
    record.update(kept_subject=subject_dir(run.uri, subject_id), installed=True)
    status.gate = record
    status.evaluation = RunDirectory(kept.run).read_status(subject_id).evaluation  # RUN's scores are the kept one's
    run.write_status(status)  # the commit: RUN holds the kept attempt
    return state
