"""The fleet against one process per subject: the same K subjects, two at a time, on this machine's CPUs.

(a) fleet: `python -m ray_jobs train MANIFEST --workers 2 --gpus-per-job 0` as a driver joining a local Ray cluster
    (started here first, and timed on its own); two long-lived workers load the tiny model once each, each class-image
    set is made once for the run.
(b) process per subject, the way diffusers' example script is used: `python -m engine train` per subject, two
    processes at a time; each one starts Python, imports torch/diffusers/transformers, loads the model from disk and
    makes its own class images into its own folder.

Both sides train with one torch thread per job (Ray gives each worker one CPU; the processes get OMP_NUM_THREADS=1),
so two jobs fill the two cores without oversubscribing them.

Prediction, written before measuring, from one subject timed in one process on this machine (2 cores):
imports of torch/diffusers/transformers/peft 4.0 s, model load 0.5 s, one class set (2 images) 0.35 s, 40 training
steps 2.3 s. A process per subject pays ~7.2 s each; two at a time, K=4 takes 2 waves, ~15 s (8 subjects: ~30 s).
The fleet pays imports + load once per worker (~4.5 s, the two in parallel), the 2 class sets once (~0.4 s, in
parallel), then 2.3 s per subject over 2 workers: K=4 ~4.6 s, so ~10 s for the driver's run plus its own start
(~4 s of imports, overlapped with nothing) — ~14 s, i.e. barely faster at K=4 — and ~5 s to start the Ray cluster.
The gap grows with K: per subject, 7.2 s of process against 2.3 s of training, so ~3x in the limit.

This machine may be shared: besides wall time, the CPU-seconds of every process each side starts (Ray's own daemons
and workers included) are counted, since contention from other work changes them far less than it changes wall time.

Run from the repo root:  python bench/fleet_vs_process_per_subject.py [--subjects 4] [--steps 40] [--class-images 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARALLEL = 2  # jobs at a time on both sides: the fleet's workers, the naive side's concurrent processes
CLASSES = ("ball", "box")


class CpuMeter:
    """CPU-seconds used by this process's descendants, sampled every 0.2 s (a process's last 0.2 s may be missed)."""

    def __init__(self):
        self.seen: dict[tuple[int, float], float] = {}
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            for proc in psutil.Process().children(recursive=True):
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        self.seen[(proc.pid, proc.create_time())] = times.user + times.system
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)

    def total(self) -> float:
        time.sleep(0.3)  # one more sample of whatever is still running
        return sum(self.seen.values())


def draw_subjects(folder: Path, count: int) -> list[dict]:
    """Manifest rows of `count` subjects with 3 synthetic images each (a yellow ball on blue, shifted)."""
    from PIL import Image, ImageDraw

    rows = []
    for i in range(count):
        uris = []
        for k in range(3):
            image = Image.new("RGB", (48, 40), (30, 60, 200))
            ImageDraw.Draw(image).ellipse((8 + i + k, 6, 38 + i + k, 34), fill=(240, 200, 20))
            path = folder / f"s{i}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            uris.append(str(path))
        cls = CLASSES[i % len(CLASSES)]
        rows.append({"subject_id": f"s{i}", "instance_images": uris,
                     "instance_prompt": f"a photo of sks {cls}", "class_prompt": f"a photo of a {cls}"})  # fmt: skip
    return rows


def timed_run(command: list[str], env: dict[str, str] | None = None) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def warm_page_cache() -> None:
    """Import the libraries once, untimed, so neither side pays for reading them from disk the first time."""
    timed_run([sys.executable, "-c", "import engine.diffusion.train, engine.diffusion.class_images, ray_jobs.fleet.worker"])


def process_per_subject(rows: list[dict], out: Path, settings: list[str]) -> tuple[float, list[float]]:
    """Wall time of K `python -m engine train` processes run PARALLEL at a time, and each process's own wall."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(row: dict) -> float:
        command = [sys.executable, "-m", "engine", "train", "--images", *row["instance_images"],
                   "--instance-prompt", row["instance_prompt"], "--class-prompt", row["class_prompt"],
                   "--subject-id", row["subject_id"], "--out", str(out / row["subject_id"]), *settings]  # fmt: skip
        return timed_run(command, env)

    began = time.perf_counter()
    with ThreadPoolExecutor(PARALLEL) as pool:
        walls = list(pool.map(one, rows))
    return time.perf_counter() - began, walls


def start_cluster() -> tuple[float, str]:
    """Start a local Ray cluster with PARALLEL CPUs; returns the seconds it took and its address."""
    import ray

    began = time.perf_counter()
    ray.init(num_cpus=PARALLEL, num_gpus=0, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - began, ray.get_runtime_context().gcs_address


def fleet(manifest: Path, run: Path, address: str, settings: list[str]) -> float:
    """Wall time of the fleet driver, `python -m ray_jobs train`, on the running cluster."""
    command = [sys.executable, "-m", "ray_jobs", "train", str(manifest), "--out", str(run), "--address", address,
               "--workers", str(PARALLEL), "--gpus-per-job", "0", "--no-progress", *settings]  # fmt: skip
    return timed_run(command)


def fleet_training_seconds(run: Path) -> list[float]:
    """Seconds each subject's train() call took inside its worker, from RUN's status files."""
    statuses = sorted((run / "subjects").glob("*/status.json"))
    return [json.loads(p.read_text())["history"][-1]["seconds"] for p in statuses]


def measure(rows: list[dict], work: Path, settings: list[str]) -> dict:
    """Both sides, one after the other: wall seconds, CPU-seconds, and each job's own time."""
    import ray

    meter = CpuMeter()
    cpu = [meter.total()]
    naive_wall, process_walls = process_per_subject(rows, work / "naive", settings)
    cpu.append(meter.total())
    cluster_wall, address = start_cluster()
    cpu.append(meter.total())
    fleet_wall = fleet(work / "subjects.parquet", work / "run", address, settings)
    cpu.append(meter.total())
    ray.shutdown()
    naive_cpu, cluster_cpu, fleet_cpu = (b - a for a, b in itertools.pairwise(cpu))
    return {"naive": (naive_wall, naive_cpu), "cluster": (cluster_wall, cluster_cpu), "fleet": (fleet_wall, fleet_cpu),
            "process_walls": process_walls, "train_seconds": fleet_training_seconds(work / "run")}  # fmt: skip


def report(k: int, m: dict) -> None:
    (naive, naive_cpu), (fleet_wall, fleet_cpu), (start, start_cpu) = m["naive"], m["fleet"], m["cluster"]
    walls, trains = m["process_walls"], m["train_seconds"]
    print(f"process per subject:   {naive:6.1f} s  {60 * k / naive:5.1f} subjects/min  {naive_cpu:6.1f} CPU-s  "
          f"(each process {min(walls):.1f}-{max(walls):.1f} s)")  # fmt: skip
    print(f"fleet, cluster up:     {fleet_wall:6.1f} s  {60 * k / fleet_wall:5.1f} subjects/min  {fleet_cpu:6.1f} CPU-s  "
          f"(each train() {min(trains):.1f}-{max(trains):.1f} s)")  # fmt: skip
    print(f"fleet + cluster start: {fleet_wall + start:6.1f} s  {60 * k / (fleet_wall + start):5.1f} subjects/min  "
          f"{fleet_cpu + start_cpu:6.1f} CPU-s  (the start alone: {start:.1f} s, {start_cpu:.1f} CPU-s)")  # fmt: skip
    print(f"fleet speed-up, wall: {naive / fleet_wall:.2f}x on a running cluster, {naive / (fleet_wall + start):.2f}x "
          f"counting its start; CPU-seconds: {naive_cpu / fleet_cpu:.2f}x, {naive_cpu / (fleet_cpu + start_cpu):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="max_train_steps")
    parser.add_argument("--class-images", type=int, default=2, help="num_class_images")
    args = parser.parse_args()
    settings = ["--set", f"max_train_steps={args.steps}", "--set", f"num_class_images={args.class_images}"]

    from ray_jobs.state.manifest import write_subjects_manifest

    work = Path(tempfile.mkdtemp(prefix="fleet-vs-process-"))
    rows = draw_subjects(work / "images", args.subjects)
    write_subjects_manifest(str(work / "subjects.parquet"), rows)
    warm_page_cache()
    load_before = os.getloadavg()[0]
    measured = measure(rows, work, settings)
    print(f"{args.subjects} subjects, {args.steps} steps, {args.class_images} class images per class prompt, "
          f"{len(CLASSES)} class prompts, {PARALLEL} at a time; work dir {work}")  # fmt: skip
    print(f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} cores)")
    report(args.subjects, measured)


if __name__ == "__main__":
    main()
