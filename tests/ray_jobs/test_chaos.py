"""Chaos: `dreamfleet run` while a killer SIGKILLs random worker processes, and once the VLM pass's model actor;
its driver killed in curation, training and the VLM pass; an `analyze` driver killed again and again.

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
from ray_jobs.state.lease import output_lease_uri, read_holder
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
    """Kills a random fleet worker every few seconds, `worker_kills` times, then the VLM actor once when it appears.
    The first `train_kills` of them wait for a worker in training, so packs are hit however long the class sets take
    on a loaded machine; the others take any busy worker (class images, training, rendering)."""

    def __init__(self, run_uri: str, worker_kills: int, train_kills: int, seed: int = 0):
        super().__init__(daemon=True)
        self.run_uri, self.worker_kills, self.train_kills = run_uri, worker_kills, train_kills
        self.kills: list[Kill] = []
        self.stop = threading.Event()
        self.rng = random.Random(seed)

    @staticmethod
    def busy(title: str) -> list[psutil.Process]:
        """Processes of this Ray actor class (or Class.method) in the middle of a method call: Ray titles them
        ray::Class.method, and ray::Class between calls."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            name = (process.info["cmdline"] or [""])[0]
            if name.startswith("ray::") and title in name and "." in name.removeprefix("ray::"):
                if not name.endswith((".__init__", ".identity")):  # still loading: not yet worth killing
                    found.append(process)
        return found

    def run(self) -> None:
        worker_kills, next_kill = 0, time.monotonic() + self.rng.uniform(1.0, 3.0)
        while not self.stop.wait(0.1):
            if worker_kills < self.worker_kills:
                workers = self.busy("SubjectWorker.train" if worker_kills < self.train_kills else "SubjectWorker")
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


def _run_under_kills(tmp_path: Path, subjects: int, prompts: list[str], worker_kills: int, *flags: str,
                     steps: int = STEPS, interval: int = INTERVAL, train_kills: int = 2):
    """`dreamfleet run` on `subjects` subjects while a Killer works: (exit code, killer, args, RUN)."""
    rows = make_subject_rows(tmp_path / "images", subjects)
    for row in rows:
        row["prompts"] = prompts
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)
    args = ["run", manifest, "--out", run, "--no-progress", "--gpus-per-job", "1",
            "--set", f"max_train_steps={steps}", "--set", f"checkpointing_steps={interval}",
            "--set", "num_class_images=2", "--set", "num_images_per_prompt=1", "--set", "vlm_batch_size=2",
            "--set", "vlm_rows_per_file=1",  # many part files: exactly once must hold per file
            "--set", "evaluate=false",  # the evaluation pass resumes as the moderation pass does (test_evaluate.py)
            # A kill before a subject's first new checkpoint uses up one of its attempts; be generous, so this test
            # is about losing nothing (test_fleet.py covers the attempt budget).
            "--set", "max_attempts=10", *flags]  # fmt: skip
    killer = Killer(run, worker_kills=worker_kills, train_kills=train_kills)
    killer.start()
    try:
        code = main(args)
    finally:
        killer.stop.set()
        killer.join()
    return code, killer, args, run


def _assert_nothing_lost_or_doubled(
    run: str, killer: Killer, subjects: int, prompts: int, worker_kills: int, steps: int = STEPS
) -> None:
    """What a user relies on after kills: see the module's docstring."""
    assert sum("SubjectWorker" in k.what for k in killer.kills) == worker_kills, killer.kills
    assert sum("VLMPredictor" in k.what for k in killer.kills) == 1, killer.kills

    # Every subject done, and trained exactly once: one successful training attempt each.
    statuses = RunDirectory(run).read_statuses()
    assert {s.state for s in statuses.values()} == {"done"} and len(statuses) == subjects
    for status in statuses.values():
        trained = [h for h in status.history if h["stage"] == "train" and h["ok"]]
        assert len(trained) == 1, status.history

    # Each kill mid-training cost each subject of the pack at most one checkpoint interval: it later resumed from the
    # checkpoint that existed at the kill (or a newer one), and its successful attempt ran exactly the steps left.
    for kill in killer.kills:
        for sid, checkpoint in kill.training.items():
            final = next(h for h in statuses[sid].history if h["stage"] == "train" and h["ok"])
            assert (final["resumed_from"] or 0) >= checkpoint, (kill, final)
            assert final["steps_run"] == steps - (final["resumed_from"] or 0)
    # The kills hit packs: at least one took several subjects down at once, and they trained packed.
    assert max(len(k.training) for k in killer.kills) >= 2, killer.kills
    assert any(len(h.get("pack_mates") or []) >= 1 for s in statuses.values() for h in s.history), statuses

    # Outputs: every image once, every moderation row once.
    generations = pq.read_table(Path(run) / "generations.parquet").to_pylist()
    keys = [(r["subject_id"], r["prompt_index"], r["image_index"]) for r in generations]
    assert sorted(keys) == sorted((f"s{i}", p, 0) for i in range(subjects) for p in range(prompts))
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


def test_a_run_survives_random_kills_and_loses_or_duplicates_nothing(ray_cluster, tmp_path):
    prompts = ["a photo of sks thing on a table", "a photo of sks thing in snow"]
    # two workers, four subjects in each pack: a kill takes a whole pack down
    code, killer, args, run = _run_under_kills(tmp_path, 8, prompts, 5, "--set", "pack_subjects=4")
    assert code == 0
    _assert_nothing_lost_or_doubled(run, killer, subjects=8, prompts=2, worker_kills=5)

    # The same command again does nothing and changes nothing, and sweeps up what a killed writer would leave.
    statuses = RunDirectory(run).read_statuses()
    images = sorted(str(p) for p in Path(run).glob("subjects/*/images/*.png"))
    debris = [Path(run) / "subjects" / "s0" / f"status.json.tmp-{'a' * 32}", Path(images[0] + f".tmp-{'b' * 32}")]
    for path in debris:
        path.write_bytes(b"half a file")
    before = {sid: s.history for sid, s in statuses.items()}
    assert main(args) == 0
    assert not any(path.exists() for path in debris)
    assert {sid: s.history for sid, s in RunDirectory(run).read_statuses().items()} == before
    assert pq.read_table(Path(run) / "moderation.parquet").num_rows == len(images)


def test_a_flux_run_survives_random_kills_and_loses_or_duplicates_nothing(ray_cluster, tmp_path):
    """The same guarantee on a flow-matching transformer: packed FLUX subjects resume from their checkpoints.
    tiny-flux trains ~10 steps a second here, so more steps keep the packs in training while the kills come."""
    code, killer, _, run = _run_under_kills(tmp_path, 4, ["a photo of sks thing on a table"], 3,
                                            "--base-model", "tiny-flux", "--set", "pack_subjects=2",
                                            "--set", "num_inference_steps=4", steps=300, interval=25,
                                            train_kills=3)  # fmt: skip
    assert code == 0
    _assert_nothing_lost_or_doubled(run, killer, subjects=4, prompts=1, worker_kills=3, steps=300)


def test_a_driver_killed_in_curation_in_training_and_in_the_vlm_pass_resumes_and_finishes(ray_cluster, tmp_path):
    """The driver runs as with `ray job submit`, a separate process on the cluster; it is SIGKILLed three times: in
    curation's detect pass once a part is committed, in training once a subject checkpointed, in the moderation
    pass while it answers."""
    rows = make_subject_rows(tmp_path / "images", 3)
    for row in rows:
        row["prompts"] = ["a photo of sks thing"]
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)
    args = ["run", manifest, "--out", run, "--no-progress", "--workers", "2",
            "--set", "max_train_steps=100", "--set", "checkpointing_steps=10", "--set", "num_class_images=2",
            "--set", "num_images_per_prompt=4", "--set", "vlm_batch_size=1", "--set", "vlm_rows_per_file=1",
            "--set", "curate=true", "--set", "moderation_threshold=1.01",  # nothing flagged: every photo kept
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

    def detect_parts() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in (Path(run) / "curation" / "detect.parquet").glob("*.parquet")}

    def checkpointed() -> bool:
        return any(complete_steps(storage.join(run, "subjects", s, "checkpoints")) for s in ("s0", "s1", "s2"))

    kill_when(driver(), lambda: bool(detect_parts()), "curation committed a part")
    committed = detect_parts()
    assert not (Path(run) / "curation.parquet").exists()  # killed mid-curation
    kill_when(driver(), checkpointed, "any subject checkpointed")
    interrupted = {sid for sid, s in RunDirectory(run).read_statuses().items() if s.state == "training"}
    assert interrupted
    kill_when(driver(), lambda: bool(Killer.busy("VLMPredictor")), "the VLM pass was answering")

    assert main(args) == 0
    statuses = RunDirectory(run).read_statuses()
    assert {s.state for s in statuses.values()} == {"done"}
    assert max(statuses[sid].history[0]["resumed_from"] or 0 for sid in interrupted) > 0  # from a checkpoint
    # Curation lost only what was in flight: the parts committed before the kill were kept, and every photo has one
    # verdict and was answered once.
    assert {p: detect_parts()[p] for p in committed} == committed
    photos = sorted(uri for row in rows for uri in row["instance_images"])
    assert sorted(pq.read_table(Path(run) / "curation.parquet").column("image").to_pylist()) == photos
    detected = pq.read_table(Path(run) / "curation" / "detect.parquet").column("id").to_pylist()
    assert len(detected) == len(set(detected)) == len(photos)
    generations = pq.read_table(Path(run) / "generations.parquet").column("id").to_pylist()
    moderated = pq.read_table(Path(run) / "moderation.parquet").column("id").to_pylist()
    assert len(generations) == 12 and sorted(moderated) == sorted(generations)
    assert not list(Path(run).glob("**/*.checkpoint/*.pending.parquet"))
    assert not [p for p in Path(run).rglob("*") if ".tmp-" in p.name]


def test_an_analyze_driver_killed_again_and_again_mid_pass_writes_every_id_once(ray_cluster, tmp_path, capsys):
    """`analyze` over a folder of many files, its driver SIGKILLed three times as soon as more part files are
    committed (other write tasks are then mid-write or mid-commit), each time rerun at once (its workers may still
    be committing: the rerun takes the dead driver's lease over, which fences them), then run to the end."""
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

    capsys.readouterr()
    assert main(args) == 0
    assert "taking over" in capsys.readouterr().err  # the last killed driver's lease, its process gone
    written = pq.read_table(out).column("id").to_pylist()
    assert sorted(written) == sorted(ids)  # every id, once
    assert not list(checkpoint.glob("*.pending.parquet"))
    lease = read_holder(output_lease_uri(str(out)))
    assert lease.epoch == 4 and lease.released is not None  # three killed drivers and the last, one after another
