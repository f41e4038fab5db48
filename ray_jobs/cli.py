"""The `dreamfleet` command line (also `python -m ray_jobs`): parses arguments and hands each command to its module.

Exit status, for every command: 0 everything succeeded; 1 the run finished but some subjects or rows failed (or its
driver lost its lease to another); 2 nothing was run (bad arguments, unreadable or invalid manifest, another driver
holds the RUN or pass output).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from engine import storage
from engine.hub import ModelError
from engine.settings import Settings, SettingsError, load_settings, parse_assignments
from engine.vlm.tasks import TASKS
from engine.vlm.tasks.base import TaskError
from ray_jobs import exit_status
from ray_jobs.metrics import RunMetrics
from ray_jobs.passes.resources import ResourceShortfall
from ray_jobs.report.any_path import write_report
from ray_jobs.report.pages import ReportError
from ray_jobs.report.run_report import write_run_report
from ray_jobs.report.thumbnails import PDF_DPI
from ray_jobs.state.lease import Lease, LeaseHeld, LeaseLost, output_lease_uri, run_lease_uri
from ray_jobs.state.manifest import ManifestError, read_subjects_manifest
from ray_jobs.state.run_dir import RUN_JSON, NotARunError, RunConflictError
from ray_jobs.state.states import FAILED


def cmd_validate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.kind == "images":
        from ray_jobs.passes.inputs import check_image_rows

        problems = list(check_image_rows(args.manifest, settings))
        for row, rid, reason in problems:
            print(f"row {row} (id {rid!r}): {reason}")
        print(f"{args.manifest}: {len(problems)} invalid row(s)")
        return exit_status.OK if not problems else exit_status.NOT_RUN
    manifest = read_subjects_manifest(args.manifest, settings, check_images=not args.skip_image_check)
    for error in manifest.errors:
        print(error)
    total = len(manifest.subjects) + len(manifest.errors)
    print(f"{args.manifest}: {total} rows, {len(manifest.subjects)} valid, {len(manifest.errors)} invalid")
    return exit_status.OK if not manifest.errors else exit_status.NOT_RUN


@contextmanager
def metrics_session(args: argparse.Namespace) -> Iterator[RunMetrics]:
    """Metrics served on --metrics-port while the command runs, pushed to --pushgateway when it ends."""
    metrics = RunMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_host)
    try:
        yield metrics
    finally:
        metrics.stop()
        if args.pushgateway:
            try:
                metrics.push(args.pushgateway)
            except OSError as err:  # the run's outcome stands; only its final figures are missing
                print(f"warning: could not push metrics to {args.pushgateway}: {err}", file=sys.stderr)


def _settings(args: argparse.Namespace, recorded: dict | None = None) -> Settings:
    overrides = parse_assignments(args.set)
    for flag in ("eval_dino_model", "eval_clip_model"):
        if getattr(args, flag, None):
            overrides[flag] = getattr(args, flag)
    return load_settings(getattr(args, "base_model", "tiny"), args.config, overrides, recorded=recorded)


STAGES = {"train": ("train",), "generate": ("generate",), "run": ("train", "generate", "moderate", "evaluate")}


def cmd_fleet(args: argparse.Namespace) -> int:
    """train, generate and run: the manifest's subjects through the fleet, resuming whatever RUN holds."""
    from ray_jobs.run import FleetRequest, run_manifest

    request = FleetRequest(
        manifest=args.manifest,
        out=args.out,
        settings=_settings(args),
        base_model=args.base_model,
        address=args.address,
        gpus_per_job=args.gpus_per_job,
        cpus_per_job=args.cpus_per_job,
        workers=args.workers,
        extend=args.extend,
        command=args.command,
        show_progress=not args.no_progress,
        vlm_model=args.vlm_model,
        verbose=args.verbose,
        lease=args.lease,
    )
    with metrics_session(args) as request.metrics:
        code, run = run_manifest(request, STAGES[args.command])
    print(f"run directory: {run.uri}")
    if args.command == "run":
        print(f"report: {write_run_report(run.uri)}")
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from ray_jobs.progress import print_evaluation, print_summary
    from ray_jobs.state.run_dir import RunDirectory, summarize

    run = RunDirectory(args.run)
    record = run.require_run()
    statuses = run.read_statuses()
    print(f"run {run.uri}: manifest {record['manifest']}, base model {record['base_model']}, "
          f"started {record['started_at']}, ended {record['ended_at'] or '(running or interrupted)'}")  # fmt: skip
    failures = [(s.subject_id, s.error or "") for s in sorted(statuses.values(), key=lambda s: s.subject_id)
                if s.state == FAILED]  # fmt: skip
    failures += [(f"row {r['row']} ({r['subject_id']!r})", r["reason"]) for r in run.read_rejected_rows()]
    print_summary(summarize(statuses), failures)
    print_withheld(run)
    print_evaluation({sid: s.evaluation for sid, s in statuses.items() if s.evaluation})
    return exit_status.OK


def cmd_report(args: argparse.Namespace) -> int:
    try:
        print(write_report(args.path, args.out, args.pdf_dpi, args.show_withheld))
    except (ReportError, NotARunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_status.NOT_RUN
    return exit_status.OK


def print_withheld(run) -> None:
    """How many generated images are withheld as unsafe (their files stay in RUN), once there are generations."""
    from engine import storage
    from ray_jobs.state.withheld import count_withheld

    if storage.exists(run.generations):
        print(f"images withheld (marked unsafe by moderation, kept in RUN): {count_withheld(run.generations)}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ray_jobs.passes.evaluate import EvaluateRequest, evaluate
    from ray_jobs.state.run_dir import RunDirectory

    record = RunDirectory(args.run).require_run()
    request = EvaluateRequest(run=args.run, settings=_settings(args, recorded=record["settings"]), address=args.address,
                              verbose=args.verbose, show_progress=not args.no_progress, lease=args.lease)  # fmt: skip
    with metrics_session(args) as metrics:
        code = evaluate(request, metrics)
    print(f"report: {write_run_report(args.run)}")
    return code


def cmd_analyze(args: argparse.Namespace) -> int:
    from ray_jobs.passes.analyze import AnalyzeRequest, analyze

    request = AnalyzeRequest(
        input=args.input, task=args.task, out=args.out, settings=_settings(args), vlm_model=args.vlm_model,
        schema_file=args.schema, policy_file=args.policy, question=args.question, categories=args.categories,
        address=args.address, verbose=args.verbose, show_progress=not args.no_progress, lease=args.lease,
    )  # fmt: skip
    with metrics_session(args) as metrics:
        return analyze(request, metrics)


def cmd_demo(args: argparse.Namespace) -> int:
    from ray_jobs.demo import run_demo

    return run_demo(args.out, verbose=args.verbose)


def _add_console_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="also print Ray's own log lines (always in Ray's logs)")


def _add_metrics_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port while running")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address to serve them on (0.0.0.0 in k8s)")
    parser.add_argument("--pushgateway", help="Pushgateway URL that receives the final values at the end")


def _add_settings_flags(
    parser: argparse.ArgumentParser, config_help: str = "YAML settings file; flags override it"
) -> None:
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")


def _add_driver_flags(parser: argparse.ArgumentParser) -> None:
    """What every command that drives Ray work takes: the cluster, the progress bar, metrics and console."""
    parser.add_argument("--address", help="Ray cluster address (default: start a local one)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    _add_metrics_flags(parser)
    _add_console_flags(parser)


def _dpi(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive resolution")
    return value


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-dino-model", help="DINO model of the evaluation: tiny, a local folder or a hub id "
                                                  "(default: facebook/dino-vits16; tiny for the tiny base models)")
    parser.add_argument("--eval-clip-model", help="CLIP model of the evaluation: tiny, a local folder or a hub id "
                                                  "(default: openai/clip-vit-large-patch14; tiny for the tiny models)")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="subjects manifest, Parquet (any fsspec URI)")
    parser.add_argument("--out", required=True, help="run directory (any fsspec URI); rerunning resumes it")
    parser.add_argument("--base-model", default="tiny",
                        help="tiny, tiny-sdxl, tiny-prior, tiny-flux, tiny-flux2, a local diffusers directory, or a "
                             "hub id (SD 1.x/2.x, SDXL, FLUX.1 [dev]/[schnell], FLUX.2 [klein])")
    _add_settings_flags(parser)
    parser.add_argument("--gpus-per-job", type=float, default=1.0, help="GPU share per worker; 0.5 packs two per GPU")
    parser.add_argument("--cpus-per-job", type=float, default=1.0, help="CPUs reserved per worker")
    parser.add_argument("--workers", type=int, help="number of workers (default: as many as the cluster holds)")
    parser.add_argument("--extend", action="store_true", help="accept another manifest or settings for this RUN")
    parser.add_argument("--vlm-model", default="tiny", help="VLM of the moderation pass of `run`")
    _add_eval_flags(parser)
    _add_driver_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamfleet", description="DreamBooth fine-tunes and VLM passes on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check a manifest's schema and every row")
    validate.add_argument("manifest", help="Parquet manifest (any fsspec URI); for images also a folder or glob")
    validate.add_argument("--kind", choices=["subjects", "images"], default="subjects")
    validate.add_argument("--base-model", default="tiny", help="decides which defaults apply to params checks")
    _add_settings_flags(validate)
    validate.add_argument("--skip-image-check", action="store_true", help="do not open every image URI")
    validate.set_defaults(handler=cmd_validate)

    for name, text in (
        ("train", "DreamBooth for every subject, sharded over the fleet"),
        ("generate", "guided generation with each trained subject"),
        ("run", "train, then generate, then moderation and evaluation passes over what was generated"),
    ):
        fleet_command = commands.add_parser(name, help=text)
        _add_run_flags(fleet_command)
        fleet_command.set_defaults(handler=cmd_fleet)

    analyze = commands.add_parser("analyze", help="a Ray Data VLM pass over an images manifest")
    analyze.add_argument("input", help="images manifest: a Parquet file, a folder or prefix of them, a glob, or Hive "
                                       "partitions (any fsspec URI); columns id, image or image_bytes")
    analyze.add_argument("--task", required=True, choices=list(TASKS))
    analyze.add_argument("--out", required=True, help="output folder of Parquet part files, e.g. captions.parquet "
                                                      "(any fsspec URI); rerunning answers only the ids not written")
    analyze.add_argument("--schema", help="JSON Schema file of the fields to extract (task extract)")
    analyze.add_argument("--policy", help="moderation policy file, YAML or JSON (default: the 13 MLCommons hazards)")
    analyze.add_argument("--question", help="the question for every row without its own 'question' (task vqa)")
    analyze.add_argument("--categories", help="comma-separated labels to localise in rows without their own "
                         "'categories' (task detect)")
    analyze.add_argument("--vlm-model", default="tiny", help="tiny, a local directory, or a Qwen3-VL hub id")
    analyze.add_argument("--base-model", default="tiny", help="which preset's defaults apply (tiny: small budgets)")
    _add_settings_flags(analyze)
    _add_driver_flags(analyze)
    analyze.set_defaults(handler=cmd_analyze)

    demo = commands.add_parser("demo", help="the whole pipeline on a small synthetic manifest, tiny models, local Ray")
    demo.add_argument("--out", default="dreamfleet-demo", help="where the demo writes (default: ./dreamfleet-demo)")
    _add_console_flags(demo)
    demo.set_defaults(handler=cmd_demo)

    evaluate = commands.add_parser("evaluate", help="DINO, CLIP-I and CLIP-T of every generated image of RUN")
    evaluate.add_argument("run", help="run directory (any fsspec URI); rerunning scores only what is not scored")
    _add_eval_flags(evaluate)
    _add_settings_flags(evaluate, "YAML settings file (over the run's recorded settings)")
    _add_driver_flags(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    report = commands.add_parser("report", help="an HTML report of a run directory or a VLM pass output")
    report.add_argument("path", help="run directory, VLM pass output folder, or Parquet file (any fsspec URI)")
    report.add_argument("--out", help="the report's HTML file (default: RUN/report.html, OUTPUT.report.html)")
    report.add_argument("--pdf-dpi", type=_dpi, default=PDF_DPI,
                        help=f"the pass's pdf_dpi, which its boxes on PDF pages are in pixels of (default {PDF_DPI:g})")
    report.add_argument("--show-withheld", action="store_true",
                        help="a run's report also shows the images withheld as unsafe (marked so); default: counted only")
    report.set_defaults(handler=cmd_report)

    status = commands.add_parser("status", help="per-state counts and failed subjects, read from RUN alone")
    status.add_argument("run", help="run directory (any fsspec URI)")
    status.set_defaults(handler=cmd_status)
    return parser


# What stops a command before it runs anything: exit 2, with the reason.
REFUSALS = (ManifestError, SettingsError, NotARunError, RunConflictError, ModelError, TaskError, ResourceShortfall,
            LeaseHeld)  # fmt: skip


def _leased(args: argparse.Namespace) -> tuple[str, str] | None:
    """(lease URI, how the holder is named) for a command that writes a RUN or a pass output; None for readers."""
    if args.command in ("train", "generate", "run"):
        return run_lease_uri(args.out), f"dreamfleet {args.command} {args.manifest} --out {args.out}"
    if args.command == "evaluate":
        return run_lease_uri(args.run), f"dreamfleet evaluate {args.run}"
    if args.command == "analyze":
        # An output inside a RUN (RUN/moderation.parquet) is written by that RUN's driver too: it takes the RUN's lease.
        run = args.out.rstrip("/").rpartition("/")[0]
        inside_run = run and any(storage.exists(uri) for uri in (storage.join(run, RUN_JSON), run_lease_uri(run)))
        uri = run_lease_uri(run) if inside_run else output_lease_uri(args.out)
        return uri, f"dreamfleet analyze {args.input} --out {args.out}"
    return None


@contextmanager
def one_driver(args: argparse.Namespace) -> Iterator[Lease | None]:
    """The lease on the RUN or pass output the command writes, held (and renewed) while it runs: a second driver
    gets LeaseHeld at once; a dead one's lease is taken over, saying so (SPEC "Commands"). A command refused before
    it ran leaves no lease it created behind."""
    leased = _leased(args)
    if leased is None:
        yield None
        return
    uri, command = leased
    ttl = _settings(args).lease_ttl
    lease = Lease(uri, command, ttl=ttl, say=lambda line: print(f"note: {line}", file=sys.stderr)).acquire()
    try:
        yield lease
    except REFUSALS:
        lease.release(ran=False)
        raise
    except BaseException:
        lease.release()
        raise
    lease.release()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with one_driver(args) as args.lease:
            return args.handler(args)
    except REFUSALS as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_status.NOT_RUN
    except LeaseLost as err:  # what ran stands; the driver that took RUN over goes on from there
        print(f"error: {err}", file=sys.stderr)
        return exit_status.SOME_FAILED


if __name__ == "__main__":
    sys.exit(main())
