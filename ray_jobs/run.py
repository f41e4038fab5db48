"""A whole manifest on the fleet: manifest → plan → scheduler → run directory, and the exit status.

`dreamfleet train` runs the "train" stage, `generate` the "generate" stage, `run` both, then a moderation pass
and an evaluation pass over everything generated.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from engine.diffusion.base_model import resolve_base_model
from engine.diffusion.families import with_family_defaults
from engine.diffusion.prompts import base_tokenizers, prompt_warnings
from engine.diffusion.subject import Subject
from engine.hub import ModelError, fingerprint
from engine.settings import Settings
from engine.tracking import TrackingGroup, finish_group, start_group
from ray_jobs import exit_status
from ray_jobs.cluster import connect
from ray_jobs.fleet.scheduler import FleetOptions, FleetScheduler, worker_slots
from ray_jobs.gate import run_quality_gate
from ray_jobs.metrics import RunMetrics
from ray_jobs.passes.analyze import AnalyzeRequest, analyze
from ray_jobs.passes.curate import CurationRequest, curate_subjects
from ray_jobs.passes.evaluate import EvaluateRequest, evaluate
from ray_jobs.passes.resources import ResourceShortfall
from ray_jobs.progress import print_summary
from ray_jobs.state.generations import assemble_generations, mark_withheld
from ray_jobs.state.lease import Lease
from ray_jobs.state.manifest import SubjectsManifest, read_subjects_manifest
from ray_jobs.state.plan import plan_fleet, row_has_own_folder
from ray_jobs.state.run_dir import RunDirectory, SubjectStatus, summarize
from ray_jobs.state.states import BELOW_GATE, FAILED, FINAL_STATE, RENDERED_STATES
from ray_jobs.state.withheld import WITHHELD, count_withheld


@dataclass
class FleetRequest:
    """What a user asked for on the command line."""

    manifest: str
    out: str
    settings: Settings
    base_model: str = "tiny"
    address: str | None = None
    gpus_per_job: float = 1.0
    cpus_per_job: float = 1.0
    workers: int | None = None
    extend: bool = False
    command: str = "train"
    show_progress: bool = True
    vlm_model: str = "tiny"
    metrics: RunMetrics | None = None
    verbose: bool = False
    lease: Lease | None = None  # the driver's lease on RUN (cli.py holds it for the command)


def record_bad_rows(run: RunDirectory, manifest: SubjectsManifest) -> list[tuple[str, str]]:
    """Bad rows become failed subjects where their id allows a folder; the rest are listed in rejected_rows.json."""
    good_ids = {s.subject_id for s in manifest.subjects}
    bad_ids = [e.subject_id for e in manifest.errors]
    rejected = []
    for error in manifest.errors:
        if row_has_own_folder(error, good_ids, bad_ids):
            run.write_status(SubjectStatus(error.subject_id, state=FAILED, error=f"manifest row {error.row}: {error.reason}"))
        else:
            rejected.append({"row": error.row, "subject_id": error.subject_id, "reason": error.reason})
    run.write_rejected_rows(rejected)
    return [(f"row {r['row']} ({r['subject_id']!r})", r["reason"]) for r in rejected]


def record_prompt_warnings(run: RunDirectory, manifest: SubjectsManifest, statuses: dict[str, SubjectStatus],
                           base_path: Path) -> None:  # fmt: skip
    """A prompt longer than the base's text encoder reads is cut, not refused: say so now, and keep it in the
    subject's status.json (`warnings`), which the report shows."""
    tokenizers = base_tokenizers(base_path)
    if not tokenizers:
        return
    for subject in manifest.subjects:
        prompts = {"instance_prompt": subject.instance_prompt, "class_prompt": subject.class_prompt,
                   **{f"prompts[{i}]": p for i, p in enumerate(subject.prompts)}}  # fmt: skip
        warnings = prompt_warnings(tokenizers, {column: p for column, p in prompts.items() if p})
        for warning in warnings:
            print(f"warning: subject {subject.subject_id}: {warning}", file=sys.stderr)
        status = statuses[subject.subject_id]
        if (status.warnings or []) != warnings:
            status.warnings = warnings or None
            run.write_status(status)


def run_manifest(request: FleetRequest, stages: tuple[str, ...]) -> tuple[int, RunDirectory]:
    """Take every subject of the manifest through `stages`, skipping what RUN shows done. Returns (exit, run)."""
    base_path = resolve_base_model(request.base_model)
    request = replace(request, settings=with_family_defaults(request.settings, base_path))
    manifest = read_subjects_manifest(request.manifest, request.settings, check_images=False)
    run = RunDirectory(request.out, request.lease)
    run.check_and_clean()
    run.start(
        command=request.command,
        manifest_uri=request.manifest,
        manifest_fingerprint=manifest.fingerprint,
        settings=request.settings,
        base_model=request.base_model,
        base_model_path=str(base_path),
        extend=request.extend,
    )
    rejected = record_bad_rows(run, manifest)
    subjects = manifest.subjects
    if request.settings.curate and "train" in stages:  # the subjects to train, on their kept (cropped) photos
        curation = CurationRequest(settings=request.settings, vlm_model=request.vlm_model, address=request.address,
                                   verbose=request.verbose, show_progress=request.show_progress)  # fmt: skip
        subjects = curate_subjects(run, subjects, curation, request.metrics)
    existing = run.read_statuses([s.subject_id for s in manifest.subjects])
    plan = plan_fleet(subjects, manifest.errors, existing, request.settings, fingerprint(base_path), stages)
    record_prompt_warnings(run, manifest, plan.statuses, base_path)
    if plan.subjects:
        connect(request.address, request.verbose, request.lease)
        num_workers, gpus_per_job = worker_slots(
            request.gpus_per_job, request.cpus_per_job, request.workers, local=request.address is None
        )
        tracking = start_tracking(run.uri, request.settings.trackers)
        options = FleetOptions(
            base_model=request.base_model,
            num_workers=num_workers,
            gpus_per_job=gpus_per_job,
            cpus_per_job=request.cpus_per_job,
            pack_subjects=request.settings.pack_subjects,
            mixed_precision=request.settings.mixed_precision,
            tracking=tracking,
        )
        on_event = request.metrics.on_fleet_event if request.metrics is not None else None
        try:
            FleetScheduler(
                run, plan, options, request.settings.max_attempts, on_event=on_event, show_progress=request.show_progress
            ).run()
        finally:
            if tracking is not None and (error := finish_group(tracking)):
                print(f"warning: experiment tracking: {error}", file=sys.stderr)
    statuses = {**plan.statuses, **run.read_statuses()}  # planned subjects may have no status file yet
    if "generate" in stages:
        assemble_generations(run, manifest.passthrough, request.settings)
    counts = summarize(statuses)
    run.finish(counts)
    failures = [(s.subject_id, s.error or "") for s in statuses.values() if s.state == FAILED] + rejected
    failures += [(sid, f"not trained yet (state {statuses[sid].state}); run `dreamfleet train` first")
                 for sid in plan.not_trained if statuses[sid].state != FAILED]  # fmt: skip
    print_summary(counts, failures)
    final = FINAL_STATE[stages[-1]]
    complete = all(statuses[s.subject_id].state in (final, *RENDERED_STATES) for s in manifest.subjects)
    moderated = moderate_generations(run, request) if "moderate" in stages else exit_status.OK
    if "moderate" in stages:
        withhold_unsafe(run, request)
    evaluated = evaluate_generations(run, request) if "evaluate" in stages else exit_status.OK
    if "evaluate" in stages:
        gate_subjects(run, manifest, subjects, request)
    run.check_and_clean()
    succeeded = complete and not manifest.errors and moderated == evaluated == exit_status.OK
    return (exit_status.OK if succeeded else exit_status.SOME_FAILED), run


def start_tracking(run_uri: str, trackers: list[str]) -> TrackingGroup | None:
    """The RUN's group in each of `trackers`, before any worker starts; a tool that cannot start is off for the
    RUN (said here, and in every subject's history), and the run goes on."""
    if not trackers:
        return None
    group = start_group(run_uri, trackers)
    for tool, error in group.failed.items():
        print(f"warning: experiment tracking: {tool} is off for this run: {error}", file=sys.stderr)
    return group


def moderate_generations(run: RunDirectory, request: FleetRequest) -> int:
    """The moderation pass of `dreamfleet run`: RUN/generations.parquet → RUN/moderation.parquet, resumable."""
    analysis = AnalyzeRequest(
        input=run.generations, task="moderate", out=run.moderation, leave_out=(WITHHELD.name,),
        settings=request.settings, vlm_model=request.vlm_model, address=request.address, verbose=request.verbose,
        lease=request.lease,
    )  # fmt: skip
    try:
        return analyze(analysis, request.metrics)
    except ResourceShortfall as err:  # training and generation stand; the same command moderates once it can
        print(f"error: moderation pass: {err}", file=sys.stderr)
        return exit_status.SOME_FAILED


def withhold_unsafe(run: RunDirectory, request: FleetRequest) -> None:
    """After the moderation pass: the images it marked unsafe are withheld (`withheld` in RUN/generations.parquet),
    said on the console and in the metrics; their files stay where they are."""
    withheld = mark_withheld(run, request.settings)
    if request.metrics is not None:
        request.metrics.images_withheld.set(withheld)
    if withheld:
        print(f"withheld: {withheld} generated image(s) the moderation pass marked unsafe (kept in RUN, "
              "`withheld` in generations.parquet; `dreamfleet report --show-withheld` shows them)")


def gate_subjects(run: RunDirectory, manifest: SubjectsManifest, curated: list[Subject], request: FleetRequest) -> None:
    """The quality gate after evaluation (ray_jobs/gate.py): each retrain round is a `run` of its own under
    RUN/gate/; the subjects still under the gate end `below_gate`, which leaves the exit status as it is. A retrain
    trains on the photos curation kept in RUN (its crops), not curating them again, unless photos train with their
    captions: a manifest carries no per-photo prompts, so those retrains curate the original photos again (greedy
    decoding gives the same verdicts and captions)."""
    recurate = any(s.instance_prompts for s in curated)

    def run_attempt(manifest_uri: str, out: str, settings: Settings) -> None:
        # --extend: a later invocation may gate other subjects into the same round's folder
        if not recurate:
            settings = settings.with_overrides({"curate": False}, source="quality gate")
        attempt = replace(request, manifest=manifest_uri, out=out, settings=settings, extend=True, command="run")
        run_manifest(attempt, ("train", "generate", "moderate", "evaluate"))

    kept_photos = {} if recurate else {s.subject_id: s for s in curated}
    subjects = [_curated(s, kept_photos[s.subject_id]) if s.subject_id in kept_photos else s for s in manifest.subjects]
    judged = run_quality_gate(run, subjects, request.manifest, request.settings, run_attempt)
    if not judged:
        return
    assemble_generations(run, manifest.passthrough, request.settings)  # the kept retrains' rows, as RUN holds them
    counts = summarize(run.read_statuses())
    run.finish(counts)
    if request.metrics is not None:  # the rounds' own runs set these for their subjects: RUN's figures again
        for state, count in counts.items():
            request.metrics.subjects.labels(state).set(count)
        request.metrics.images_withheld.set(count_withheld(run.generations))
    below = sorted(sid for sid, state in judged.items() if state == BELOW_GATE)
    print(f"quality gate: {len(judged) - len(below)} of {len(judged)} subject(s) under the gate passed after "
          f"retraining; below_gate (not a failure): {', '.join(below) or 'none'}")


def _curated(original: Subject, curated: Subject) -> Subject:
    """`curated` with its crops' paths absolute: the retrain's manifest reads a relative path as the manifest's."""
    own = set(original.instance_images)
    return replace(curated, instance_images=tuple(uri if uri in own or "://" in uri else os.path.abspath(uri)
                                                  for uri in curated.instance_images))  # fmt: skip


def evaluate_generations(run: RunDirectory, request: FleetRequest) -> int:
    """The evaluation pass of `dreamfleet run`, where its models are at hand: a model that cannot be had (offline,
    not cached) skips it with a note; `dreamfleet evaluate RUN` scores the images later."""
    if not request.settings.evaluate:
        return exit_status.OK
    evaluation = EvaluateRequest(run=run.uri, settings=request.settings, address=request.address,
                                 verbose=request.verbose, show_progress=request.show_progress,
                                 lease=request.lease)  # fmt: skip
    try:
        return evaluate(evaluation, request.metrics)
    except ModelError as err:
        print(f"note: evaluation skipped, its models are not at hand ({err}); `dreamfleet evaluate {run.uri}` "
              "scores the images once they are", file=sys.stderr)  # fmt: skip
        return exit_status.OK
    except ResourceShortfall as err:  # training and generation stand; the same command evaluates once it can
        print(f"error: evaluation pass: {err}", file=sys.stderr)
        return exit_status.SOME_FAILED
