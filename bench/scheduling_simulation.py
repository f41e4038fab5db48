"""The fleet scheduler's own overhead: FleetScheduler driving SleepWorker actors (bench/sleep_worker.py) that sleep
instead of training, on a local Ray cluster with logical GPUs. Training is packed as the fleet packs it
(--pack-subjects, default 1: one subject per worker at a time); the stand-in trains a pack at the speed of one
subject, the GPU ideal, so the ideal makespan is the total sleep / (GPUs · pack size).

Measures the makespan against the ideal (goal ≤ 1.05x), the driver's overhead per subject (goal
< 50 ms) three ways — (makespan - ideal) / subjects, the driver thread's CPU time, and optionally a cProfile of the
driver thread, whose time outside ray.wait is the driver's own work — and the driver's memory (RSS). Every actor
logs when each call started and ended, so the GPU-seconds the run lost are split into start-up (before an actor's
first job), turnaround (between two jobs of one actor: the driver noticing, writing status.json, submitting the
next) and tail (after an actor's last job). --kill-after SIGKILLs one actor mid-run, to see what a replacement worker
that takes --init-seconds to start (its model load) costs the rest of the fleet.

The issue's goal, 10,000 subjects on 64 GPUs:
    python bench/scheduling_simulation.py --subjects 10000 --gpus 64 --work-seconds 0.75
Smaller, with a profile of the driver thread, packed 4 to a worker, and with a worker killed mid-run:
    python bench/scheduling_simulation.py --subjects 2000 --gpus 16 --work-seconds 0.5 --profile
    python bench/scheduling_simulation.py --subjects 2000 --gpus 16 --work-seconds 0.5 --pack-subjects 4
    python bench/scheduling_simulation.py --subjects 1000 --gpus 16 --work-seconds 0.5 --init-seconds 5 --kill-after 300
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import logging
import os
import pstats
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import ray  # noqa: E402

import ray_jobs.fleet.scheduler  # noqa: E402
from bench.sleep_worker import SleepWorker, work_seconds  # noqa: E402
from engine.diffusion.subject import Subject  # noqa: E402
from engine.settings import Settings  # noqa: E402
from ray_jobs.fleet.scheduler import FleetOptions, FleetScheduler  # noqa: E402
from ray_jobs.state.plan import plan_fleet  # noqa: E402
from ray_jobs.state.run_dir import RunDirectory  # noqa: E402

MIB = 2**20
CLASSES = ("dog", "cat")
# Driver-thread functions worth naming in the profile: (label, file the function is in, function name).
PROFILED = (
    ("FleetScheduler.run", "ray_jobs/scheduler.py", "run"),
    ("  _enqueue_plan", "ray_jobs/scheduler.py", "_enqueue_plan"),
    ("  _start_worker", "ray_jobs/scheduler.py", "_start_worker"),
    ("  _started (ray.get)", "ray_jobs/scheduler.py", "_started"),
    ("  _dispatch", "ray_jobs/scheduler.py", "_dispatch"),
    ("    _submit_train", "ray_jobs/scheduler.py", "_submit_train"),
    ("  _returned", "ray_jobs/scheduler.py", "_returned"),
    ("    _subject_done", "ray_jobs/scheduler.py", "_subject_done"),
    ("  ray.wait", "ray/_private/worker.py", "wait"),
    ("  ray.get", "ray/_private/worker.py", "get"),
    ("  actor method call", "ray/actor.py", "_actor_method_call"),
    ("  RunDirectory.write_status", "ray_jobs/run_dir.py", "write_status"),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--gpus", type=int, default=64, help="logical GPUs, one worker each")
    parser.add_argument("--cpus", type=int, help="logical CPUs (default: as many as GPUs; each worker takes one)")
    parser.add_argument("--pack-subjects", type=int, default=1, help="subjects a worker trains at once (FleetOptions)")
    parser.add_argument("--work-seconds", type=float, default=0.75, help="mean sleep per subject")
    parser.add_argument("--jitter", type=float, default=0.5, help="sleeps are uniform in mean·(1 ± jitter)")
    parser.add_argument("--class-set-seconds", type=float, default=1.0, help="sleep per class-image set")
    parser.add_argument("--init-seconds", type=float, default=0.0, help="sleep in each worker's __init__")
    parser.add_argument("--kill-after", type=int, help="SIGKILL one worker after this many subjects finished")
    parser.add_argument("--profile", action="store_true", help="cProfile the driver thread (slows it down)")
    parser.add_argument("--run-dir", help="where RUN goes (default: a new temporary directory)")
    return parser.parse_args()


def make_subjects(count: int) -> list[Subject]:
    subjects = []
    for i in range(count):
        cls = CLASSES[i % len(CLASSES)]
        subjects.append(Subject(f"subject-{i:06d}", (f"s3://bucket/{i}/0.png",), f"a sks {cls}", f"a photo of a {cls}"))
    return subjects


def start_cluster(args: argparse.Namespace, timeline_dir: Path) -> float:
    env = {
        "PYTHONPATH": str(REPO),  # the actors import bench.sleep_worker
        "SLEEP_WORK_SECONDS": str(args.work_seconds),
        "SLEEP_JITTER": str(args.jitter),
        "SLEEP_CLASS_SET_SECONDS": str(args.class_set_seconds),
        "SLEEP_INIT_SECONDS": str(args.init_seconds),
        "SLEEP_TIMELINE_DIR": str(timeline_dir),
    }
    began = time.perf_counter()
    ray.init(num_cpus=args.cpus or args.gpus, num_gpus=args.gpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, runtime_env={"env_vars": env})  # fmt: skip
    return time.perf_counter() - began


def worker_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if any("SleepWorker" in c for c in p.info["cmdline"] or [])]


class FleetWatcher:
    """The scheduler's on_event: counts finished subjects, samples the workers' memory half-way (from a side thread,
    so the driver thread is not held up) and, if asked, kills one worker."""

    def __init__(self, subjects: int, kill_after: int | None):
        self.finished, self.subjects, self.kill_after = 0, subjects, kill_after
        self.killed_at: float | None = None
        self.workers: list[tuple[int, int]] = []  # (rss, uss) of each worker process
        self.sampled = threading.Thread(target=self._sample_memory, daemon=True)

    def __call__(self, kind: str, data: dict) -> None:
        if not kind.endswith("_attempt"):
            return
        self.finished += 1
        if self.finished == self.subjects // 2:
            self.sampled.start()
        if self.finished == self.kill_after:
            os.kill(worker_processes()[0].pid, signal.SIGKILL)
            self.killed_at = time.time()

    def _sample_memory(self) -> None:
        for proc in worker_processes():
            try:
                info = proc.memory_full_info()
            except psutil.NoSuchProcess:  # the run ended while sampling
                continue
            self.workers.append((info.rss, info.uss))


class TimedGets:
    """Stands in for the `ray` module inside ray_jobs.fleet.scheduler to time each ray.get there. The driver means to wait
    only in ray.wait; a ray.get that blocks holds up every worker's next job (e.g. a worker's identity while it
    starts)."""

    def __init__(self):
        self.blocked: list[tuple[float, float]] = []  # (Unix time, seconds) of each ray.get that took over 0.1 s

    def __getattr__(self, name: str):
        return getattr(ray, name)

    def get(self, *args, **kwargs):
        began = time.time()
        try:
            return ray.get(*args, **kwargs)
        finally:
            if time.time() - began > 0.1:
                self.blocked.append((began, time.time() - began))


@dataclass
class FleetRun:
    counts: dict[str, int]
    began: float  # Unix time, to line up with the workers' timelines
    ended: float
    makespan: float
    driver_cpu: float  # CPU seconds of the driver thread
    rss_end: int
    profile: cProfile.Profile | None
    blocked_gets: list[tuple[float, float]]


def run_fleet(run: RunDirectory, plan, args: argparse.Namespace, watcher: FleetWatcher) -> FleetRun:
    options = FleetOptions(base_model="sleep", num_workers=args.gpus, gpus_per_job=1.0,
                           pack_subjects=args.pack_subjects, worker_class=SleepWorker)  # fmt: skip
    scheduler = FleetScheduler(run, plan, options, max_attempts=3, on_event=watcher, show_progress=False)
    profile = cProfile.Profile() if args.profile else None
    ray_jobs.fleet.scheduler.ray = gets = TimedGets()
    cpu, began, wall = time.thread_time(), time.time(), time.perf_counter()
    if profile:
        profile.enable()
    counts = scheduler.run()
    if profile:
        profile.disable()
    makespan, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    ray_jobs.fleet.scheduler.ray = ray
    rss = psutil.Process().memory_info().rss
    return FleetRun(counts, began, time.time(), makespan, cpu, rss, profile, gets.blocked)


def read_timeline(folder: Path) -> dict[str, list[tuple[str, float, float, int]]]:
    """Each actor's calls, in start order: pid -> [(kind, start, end, subjects the call ended)]."""
    calls = defaultdict(list)
    for file in folder.glob("*.txt"):
        for line in file.read_text().splitlines():
            kind, names, start, end = line.split()
            ended = 0 if kind == "class_set" or names == "-" else len(names.split(","))
            calls[file.stem].append((kind, float(start), float(end), ended))
    return {pid: sorted(c, key=lambda c: c[1]) for pid, c in calls.items()}


def lost_gpu_time(calls: dict[str, list], began: float, ended: float) -> dict[str, float | list]:
    """GPU-seconds of the run not spent in a job: before each actor's first, between jobs, after its last."""
    first = [c[0][1] - began for c in calls.values()]
    all_up = began + max(first)
    finished_after = sum(n for c in calls.values() for kind, _, end, n in c if kind == "train" and end > all_up)
    idle = [(prev[2], nxt[1]) for c in calls.values() for prev, nxt in itertools.pairwise(c)]  # (from, to) per gap
    return {
        "busy": sum(end - start for c in calls.values() for _, start, end, _ in c),
        "startup": sum(first),
        "first_job_after": first,
        "turnaround": sum(to - since for since, to in idle),
        "idle": idle,
        "tail": sum(ended - c[-1][2] for c in calls.values()),
        "throughput": finished_after / (ended - all_up),  # subjects per second once every worker is up
    }


def profile_rows(profile: cProfile.Profile, subjects: int) -> list[str]:
    stats = pstats.Stats(profile).stats
    rows = []
    for label, fragment, name in PROFILED:
        found = [(v[1], v[3]) for k, v in stats.items() if k[2] == name and k[0].endswith(fragment)]
        if found:
            calls, cumulative = max(found, key=lambda f: f[1])
            rows.append(f"{label:30s} {calls:7d} calls {cumulative:8.2f} s {1e3 * cumulative / subjects:7.2f} ms/subject")
    return rows


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def report_time(args, plan, fleet: FleetRun, lost: dict, setup: dict[str, float]) -> None:
    n, gpus, pack = args.subjects, args.gpus, args.pack_subjects
    # A pack of K trains at the speed of one subject: K lanes per GPU, every lane kept full.
    ideal = (sum(work_seconds(f"subject-{i:06d}", args.work_seconds, args.jitter) for i in range(n)) / pack
             + len(plan.class_sets) * args.class_set_seconds) / gpus  # fmt: skip
    torch_in_workers = {s.worker.get("torch_loaded") for s in plan.statuses.values() if s.worker}
    print(f"{n} subjects on {gpus} logical GPUs ({args.cpus or gpus} logical CPUs, {os.cpu_count()} cores), "
          f"packs of {pack}, "
          f"{args.work_seconds} s ± {100 * args.jitter:.0f}% each, {len(plan.class_sets)} class sets of "
          f"{args.class_set_seconds} s, worker start-up sleep {args.init_seconds} s"
          f"{', driver profiled' if fleet.profile else ''}; load average before: {setup['load']:.2f}")  # fmt: skip
    print(f"states: {fleet.counts}; torch imported in the workers: {torch_in_workers}")
    print(f"plan_fleet: {setup['plan']:.2f} s; Ray cluster start: {setup['cluster']:.1f} s (not in the makespan)")
    ratio = f"{fleet.makespan / ideal:.3f}x ideal" if ideal else "no work: the driver's and Ray's speed alone"
    print(f"makespan {fleet.makespan:.1f} s, ideal {ideal:.1f} s: {ratio}")
    print(f"driver overhead per subject: (makespan - ideal) / subjects = {1e3 * (fleet.makespan - ideal) / n:.2f} ms; "
          f"driver thread CPU {1e3 * fleet.driver_cpu / n:.2f} ms")  # fmt: skip
    print(f"GPU-seconds: {gpus * fleet.makespan:.0f} = busy {lost['busy']:.0f} + start-up {lost['startup']:.0f} "
          f"+ turnaround {lost['turnaround']:.0f} + tail {lost['tail']:.0f}")  # fmt: skip
    need = f" (keeping every slot busy needs {gpus * pack / args.work_seconds:.1f})" if args.work_seconds else ""
    after_start = (lost["busy"] + lost["turnaround"] + lost["tail"]) / max(lost["busy"], 1e-9)
    print(f"once every worker is up: {lost['throughput']:.1f} subjects/s finished{need}; "
          f"(busy + turnaround + tail) / busy = {after_start:.3f}")  # fmt: skip


def report_gaps(lost: dict, fleet: FleetRun, watcher: FleetWatcher) -> None:
    first, gaps = lost["first_job_after"], [to - since for since, to in lost["idle"]]
    print(f"an actor's first job began after: median {statistics.median(first):.1f} s, last {max(first):.1f} s")
    long_gaps = [g for g in gaps if g > 1.0]
    print(f"turnaround between two jobs of one actor: mean {1e3 * statistics.fmean(gaps):.1f} ms, "
          f"p50 {1e3 * percentile(gaps, 0.5):.1f}, p99 {1e3 * percentile(gaps, 0.99):.1f}, max {1e3 * max(gaps):.0f} ms;"
          f" {len(long_gaps)} over 1 s, {sum(long_gaps):.0f} GPU-s in all")  # fmt: skip
    blocked = fleet.blocked_gets
    if blocked:
        at, longest = max(blocked, key=lambda b: b[1])
        print(f"driver blocked in ray.get: {len(blocked)} times over 0.1 s, {sum(b[1] for b in blocked):.1f} s in all, "
              f"longest {longest:.1f} s from {at - fleet.began:.1f} s into the run")  # fmt: skip
    if watcher.killed_at:
        # Other workers' gaps that began after the kill and lasted over a second: idle while the driver was busy.
        stalled = [to - since for since, to in lost["idle"] if since >= watcher.killed_at and to - since > 1.0]
        print(f"one worker killed {watcher.killed_at - fleet.began:.1f} s into the run; afterwards {len(stalled)} gaps "
              f"over 1 s, mean {statistics.fmean(stalled or [0]):.1f} s, {sum(stalled):.0f} GPU-s in all")


def report_memory(fleet: FleetRun, watcher: FleetWatcher, setup: dict[str, float]) -> None:
    print(f"driver RSS: {setup['rss_imports'] / MIB:.0f} MiB after imports, {setup['rss_plan'] / MIB:.0f} MiB with the "
          f"plan, {fleet.rss_end / MIB:.0f} MiB at the end (peak {setup['rss_peak'] / MIB:.0f} MiB)")  # fmt: skip
    if watcher.workers:
        rss, uss = (sum(m[i] for m in watcher.workers) / len(watcher.workers) / MIB for i in (0, 1))
        print(f"workers half-way: {len(watcher.workers)} processes, RSS {rss:.0f} MiB each, USS {uss:.0f} MiB each")


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="sched-sim-"))
    (work / "timeline").mkdir()
    run = RunDirectory(args.run_dir or str(work / "run"))
    setup = {"load": os.getloadavg()[0], "rss_imports": psutil.Process().memory_info().rss}

    began = time.perf_counter()
    plan = plan_fleet(make_subjects(args.subjects), [], {}, Settings(), base_fingerprint="sleep", stages=("train",))
    setup["plan"], setup["rss_plan"] = time.perf_counter() - began, psutil.Process().memory_info().rss
    setup["cluster"] = start_cluster(args, work / "timeline")

    watcher = FleetWatcher(args.subjects, args.kill_after)
    fleet = run_fleet(run, plan, args, watcher)
    setup["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if watcher.sampled.is_alive():
        watcher.sampled.join(timeout=30)
    ray.shutdown()
    lost = lost_gpu_time(read_timeline(work / "timeline"), fleet.began, fleet.ended)
    report_time(args, plan, fleet, lost, setup)
    report_gaps(lost, fleet, watcher)
    report_memory(fleet, watcher, setup)
    if fleet.profile:
        print("driver thread, cumulative wall time (ray.wait blocks while no job has finished):")
        print("\n".join(profile_rows(fleet.profile, args.subjects)))


if __name__ == "__main__":
    main()
