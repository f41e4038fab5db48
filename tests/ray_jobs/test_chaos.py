"""Chaos: `dreamfleet run` while a killer SIGKILLs random worker processes, and once the VLM pass's model actor.

What a user relies on after such a run: it finishes; every subject is done exactly once; generations.parquet and
moderation.parquet hold every row once; no temporary or half-written file is left in RUN; and each kill cost at most
one checkpoint interval of training.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from engine import storage
from engine.diffusion.checkpoints import complete_steps
from ray_jobs.cli import main
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory
from tests.helpers.subjects import make_subject_rows

STEPS, INTERVAL = 40, 5


@dataclass
class Kill:
    pid: int
    what: str  # the process title, e.g. ray::SubjectWorker.train
    # the subjects of its pack, each with its newest complete checkpoint at the moment of the kill
    training: dict[str, int] = field(default_factory=dict)


class Killer(threading.Thread):
    """Kills a random fleet worker every few seconds, `worker_kills` times, then the VLM actor once when it appears."""

    def __init__(self, run_uri: str, worker_kills: int, seed: int = 0):
        super().__init__(daemon=True)
        self.run_uri, self.worker_kills = run_uri, worker_kills
        self.kills: list[Kill] = []
        self.stop = threading.Event()
        self.rng = random.Random(seed)

    @staticmethod
    def busy(title: str) -> list[psutil.Process]:
        """Processes of this Ray actor class in the middle of a method call (Ray titles them ray::Class.method)."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("ray::") and title in cmdline[0] and "." in cmdline[0].split(title)[-1]:
                if not cmdline[0].endswith((".__init__", ".identity")):  # still loading: not yet worth killing
                    found.append(process)
        return found

    def run(self) -> None:
        worker_kills, next_kill = 0, time.monotonic() + self.rng.uniform(1.0, 3.0)
        while not self.stop.wait(0.1):
            if worker_kills < self.worker_kills:
                workers = self.busy("SubjectWorker")
                if workers and time.monotonic() >= next_kill:
                    self.kill(self.rng.choice(workers))
                    worker_kills, next_kill = worker_kills + 1, time.monotonic() + self.rng.uniform(1.0, 3.0)
                continue
            vlm = self.busy("VLMPredictor")
            if vlm:
                self.kill(vlm[0])
                return

    def kill(self, process: psutil.Process) -> None:
        try:
            title = process.cmdline()[0]
        except psutil.Error:
            return
        kill = Kill(process.pid, title)
        for sid, status in RunDirectory(self.run_uri).read_statuses().items():
            if status.state == "training" and status.worker and status.worker["pid"] == process.pid:
                steps = complete_steps(storage.join(self.run_uri, "subjects", sid, "checkpoints"))
                kill.training[sid] = (steps or [0])[-1]
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            return
        self.kills.append(kill)


def test_a_run_survives_random_kills_and_loses_or_duplicates_nothing(ray_cluster, tmp_path):
    rows = make_subject_rows(tmp_path / "images", 8)
    for row in rows:
        row["prompts"] = ["a photo of sks thing on a table", "a photo of sks thing in snow"]
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)
    args = ["run", manifest, "--out", run, "--no-progress", "--gpus-per-job", "1",
            "--set", f"max_train_steps={STEPS}", "--set", f"checkpointing_steps={INTERVAL}",
            "--set", "num_class_images=2", "--set", "num_images_per_prompt=1", "--set", "vlm_batch_size=2",
            "--set", "vlm_rows_per_file=1",  # many part files: exactly once must hold per file
            "--set", "evaluate=false",  # the evaluation pass resumes as the moderation pass does (test_evaluate.py)
            "--set", "pack_subjects=4",  # two workers, four subjects in each pack: a kill takes a whole pack down
            # A kill before a subject's first new checkpoint uses up one of its attempts; be generous, so this test
            # is about losing nothing (test_fleet.py covers the attempt budget).
            "--set", "max_attempts=10"]  # fmt: skip
    killer = Killer(run, worker_kills=5)
    killer.start()
    try:
        code = main(args)
    finally:
        killer.stop.set()
        killer.join()

    assert code == 0
    assert sum("SubjectWorker" in k.what for k in killer.kills) == 5, killer.kills
    assert sum("VLMPredictor" in k.what for k in killer.kills) == 1, killer.kills

    # Every subject done, and trained exactly once: one successful training attempt each.
    statuses = RunDirectory(run).read_statuses()
    assert {s.state for s in statuses.values()} == {"done"} and len(statuses) == 8
    for status in statuses.values():
        trained = [h for h in status.history if h["stage"] == "train" and h["ok"]]
        assert len(trained) == 1, status.history

    # Each kill mid-training cost each subject of the pack at most one checkpoint interval: it later resumed from the
    # checkpoint that existed at the kill (or a newer one), and its successful attempt ran exactly the steps left.
    for kill in killer.kills:
        for sid, checkpoint in kill.training.items():
            final = next(h for h in statuses[sid].history if h["stage"] == "train" and h["ok"])
            assert (final["resumed_from"] or 0) >= checkpoint, (kill, final)
            assert final["steps_run"] == STEPS - (final["resumed_from"] or 0)
    # The kills hit packs: at least one took several subjects down at once, and they trained packed.
    assert max(len(k.training) for k in killer.kills) >= 2, killer.kills
    assert any(len(h.get("pack_mates") or []) >= 1 for s in statuses.values() for h in s.history), statuses

    # Outputs: every image once, every moderation row once.
    generations = pq.read_table(Path(run) / "generations.parquet").to_pylist()
    keys = [(r["subject_id"], r["prompt_index"], r["image_index"]) for r in generations]
    assert sorted(keys) == sorted((f"s{i}", p, 0) for i in range(8) for p in range(2))
    moderation = pq.read_table(Path(run) / "moderation.parquet").to_pylist()
    assert sorted(r["id"] for r in moderation) == sorted(r["id"] for r in generations)

    # Nothing half-written: no temporaries, no incomplete checkpoint, no part files, no stray or broken images.
    assert not [p for p in Path(run).rglob("*") if ".tmp-" in p.name]
    assert not list(Path(run).glob("moderation.parquet.checkpoint/*.pending.parquet"))
    for folder in Path(run).glob("subjects/*/checkpoints/step-*"):
        assert (folder / "state.json").exists(), folder
    images = sorted(str(p) for p in Path(run).glob("subjects/*/images/*.png"))
    assert images == sorted(r["image"] for r in generations)
    for image in images:
        Image.open(image).load()

    # The same command again does nothing and changes nothing, and sweeps up what a killed writer would leave.
    debris = [Path(run) / "subjects" / "s0" / f"status.json.tmp-{'a' * 32}", Path(images[0] + f".tmp-{'b' * 32}")]
    for path in debris:
        path.write_bytes(b"half a file")
    before = {sid: s.history for sid, s in statuses.items()}
    assert main(args) == 0
    assert not any(path.exists() for path in debris)
    assert {sid: s.history for sid, s in RunDirectory(run).read_statuses().items()} == before
    assert pq.read_table(Path(run) / "moderation.parquet").num_rows == len(generations)


def test_a_driver_killed_in_training_and_again_in_the_vlm_pass_resumes_and_finishes(ray_cluster, tmp_path):
    """The driver runs as with `ray job submit`, a separate process on the cluster; it is SIGKILLed twice."""
    rows = make_subject_rows(tmp_path / "images", 3)
    for row in rows:
        row["prompts"] = ["a photo of sks thing"]
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)
    args = ["run", manifest, "--out", run, "--no-progress", "--workers", "2",
            "--set", "max_train_steps=100", "--set", "checkpointing_steps=10", "--set", "num_class_images=2",
            "--set", "num_images_per_prompt=4", "--set", "vlm_batch_size=1", "--set", "vlm_rows_per_file=1",
            "--set", "evaluate=false"]  # fmt: skip
    address = ray_cluster.get_runtime_context().gcs_address

    def driver() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "ray_jobs", *args, "--address", address],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def kill_when(process: subprocess.Popen, condition, what: str) -> None:
        deadline = time.time() + 300
        while not condition():
            assert process.poll() is None and time.time() < deadline, f"the driver ended before {what}"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def checkpointed() -> bool:
        return any(complete_steps(storage.join(run, "subjects", s, "checkpoints")) for s in ("s0", "s1", "s2"))

    kill_when(driver(), checkpointed, "any subject checkpointed")
    interrupted = {sid for sid, s in RunDirectory(run).read_statuses().items() if s.state == "training"}
    assert interrupted
    kill_when(driver(), lambda: bool(Killer.busy("VLMPredictor")), "the VLM pass was answering")

    assert main(args) == 0
    statuses = RunDirectory(run).read_statuses()
    assert {s.state for s in statuses.values()} == {"done"}
    assert max(statuses[sid].history[0]["resumed_from"] or 0 for sid in interrupted) > 0  # from a checkpoint
    generations = pq.read_table(Path(run) / "generations.parquet").column("id").to_pylist()
    moderated = pq.read_table(Path(run) / "moderation.parquet").column("id").to_pylist()
    assert len(generations) == 12 and sorted(moderated) == sorted(generations)
    assert not list(Path(run).glob("moderation.parquet.checkpoint/*.pending.parquet"))
    assert not [p for p in Path(run).rglob("*") if ".tmp-" in p.name]


def test_an_analyze_driver_killed_again_and_again_mid_pass_writes_every_id_once(ray_cluster, tmp_path):
    """`analyze` over a folder of many files, its driver SIGKILLed three times as soon as more part files are
    committed (other write tasks are then mid-write or mid-commit), then run to the end."""
    images = tmp_path / "images"
    images.mkdir()
    docs = tmp_path / "docs"
    docs.mkdir()
    ids = []
    for k in range(8):
        rows = []
        for i in range(5):
            path = images / f"{k}-{i}.png"
            Image.new("RGB", (40 + i, 30 + k), (20 * k, 10 * i, 90)).save(path)
            rows.append({"id": f"doc-{k}-{i}", "image": str(path)})
        pq.write_table(pa.Table.from_pylist(rows), docs / f"part-{k}.parquet")
        ids += [r["id"] for r in rows]
    out = tmp_path / "ocr.parquet"
    args = ["analyze", str(docs), "--task", "ocr", "--out", str(out), "--no-progress",
            "--set", "vlm_batch_size=1", "--set", "vlm_rows_per_file=1"]  # fmt: skip
    address = ray_cluster.get_runtime_context().gcs_address
    checkpoint = Path(f"{out}.checkpoint")

    def committed() -> int:
        return len([f for f in checkpoint.glob("*.parquet") if not f.name.endswith(".pending.parquet")])

    for _ in range(3):
        before = committed()
        process = subprocess.Popen([sys.executable, "-m", "ray_jobs", *args, "--address", address],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 300
        while committed() < before + 2:
            assert process.poll() is None and time.time() < deadline, "the pass ended before it was killed"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert committed() < len(ids)  # killed mid-pass each time

    assert main(args) == 0
    written = pq.read_table(out).column("id").to_pylist()
    assert sorted(written) == sorted(ids)  # every id, once
    assert not list(checkpoint.glob("*.pending.parquet"))
