"""`dreamfleet run` with the quality gate, through the CLI on a local cluster: a subject under the gate is retrained
once with the adjusted recipe, rendered and scored again, every attempt recorded, and it ends `below_gate` when
still under it; the exit status is as without the gate, and a rerun redoes nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from engine.diffusion.checkpoints import complete_steps
from engine.settings import load_settings
from ray_jobs.cli import main
from ray_jobs.metrics import RunMetrics
from ray_jobs.run import FleetRequest, run_manifest
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory
from tests.helpers.subjects import make_subject_rows

TINY = ["--set", "max_train_steps=4", "--set", "checkpointing_steps=2", "--set", "num_class_images=2",
        "--set", "num_images_per_prompt=2", "--no-progress"]  # fmt: skip


def test_a_subject_under_the_gate_is_retrained_once_and_ends_below_gate(ray_cluster, tmp_path, capsys):
    rows = make_subject_rows(tmp_path / "images", 2)
    for row in rows:
        row["prompts"] = ["a photo of sks ball on a table"]
    rows[1]["prompts"] = []  # nothing rendered, nothing to judge: the gate leaves it alone
    manifest, run = str(tmp_path / "subjects.parquet"), tmp_path / "run"
    write_subjects_manifest(manifest, rows)
    # A DINO bar no generated image reaches (a cosine of 1: the photo itself), so the retrain happens for sure.
    args = ["run", manifest, "--out", str(run), *TINY, "--set", "gate_min_dino=1.0"]
    assert main(args) == 0  # below the gate is not a failure
    out = capsys.readouterr().out
    assert "quality gate: 1 subject(s) under the gate train again (s0), round 1 of 1" in out
    assert "below_gate (not a failure): s0" in out

    status = RunDirectory(str(run)).read_status("s0")
    assert status.state == "below_gate" and RunDirectory(str(run)).read_status("s1").state == "done"
    first, retry = status.gate["attempts"]
    assert first["params"] == {} and first["under_gate"] == ["dino"] and first["scores"]["dino"] < 1.0
    assert first["scores"] == {k: status.evaluation[k] for k in first["scores"]}
    assert retry["params"] == {"max_train_steps": 6}  # DINO too low: half as many steps again
    assert retry["run"] == str(run / "gate" / "attempt-1") and retry["scores"]["images"] == 2
    kept = Path(status.gate["kept_subject"])
    assert kept == run / "subjects/s0" and (kept / "weights").is_dir()  # the kept attempt is in place in RUN
    # The retrain trained its adjusted recipe, rendered and was scored in its own run directory.
    attempt = RunDirectory(retry["run"]).read_status("s0")
    assert attempt.state == "done" and attempt.evaluation["dino"] == retry["scores"]["dino"]
    steps = [json.loads(line)["step"] for line in (run / "gate/attempt-1/subjects/s0/train_log.jsonl").open()]
    assert max(steps) == 6
    assert len(list((run / "gate/attempt-1/subjects/s0/images").glob("*.png"))) == 2

    assert main(["status", str(run)]) == 0
    assert "below_gate" in capsys.readouterr().out
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "quality gate: 2 attempts" in html and "still below the gate" in html

    # The same command again: nothing is trained, rendered or recorded anew.
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.suffix in (".safetensors", ".png")}
    metrics = RunMetrics()
    request = FleetRequest(manifest=manifest, out=str(run), show_progress=False, metrics=metrics,
                           settings=load_settings("tiny", overrides={"max_train_steps": 4, "checkpointing_steps": 2,
                                                                     "num_class_images": 2, "num_images_per_prompt": 2,
                                                                     "gate_min_dino": 1.0}))  # fmt: skip
    code, _ = run_manifest(request, ("train", "generate", "moderate", "evaluate"))
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert RunDirectory(str(run)).read_status("s0").gate["attempts"] == status.gate["attempts"]
    assert metrics.registry.get_sample_value("dreamfleet_subjects", {"state": "below_gate"}) == 1


def test_a_driver_killed_in_the_gates_retrain_loses_at_most_that_retrains_work(ray_cluster, tmp_path):
    """The driver runs as with `ray job submit`; it is SIGKILLed once the gate's retrain round has checkpointed, and
    the same command again finishes the round: the retrain resumes from its checkpoint, the subject ends with its
    gate outcome, and RUN's tables hold each image's row once."""
    rows = make_subject_rows(tmp_path / "images", 1)
    rows[0]["prompts"] = ["a photo of sks ball on a table"]
    manifest, run = str(tmp_path / "subjects.parquet"), tmp_path / "run"
    write_subjects_manifest(manifest, rows)
    # A DINO bar no image reaches, so the retrain happens for sure; 30 steps in it, checkpointed every 5.
    args = ["run", manifest, "--out", str(run), "--no-progress", "--set", "max_train_steps=20",
            "--set", "checkpointing_steps=5", "--set", "num_class_images=2", "--set", "num_images_per_prompt=2",
            "--set", "gate_min_dino=1.0"]  # fmt: skip
    address = ray_cluster.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "ray_jobs", *args, "--address", address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    retrain = run / "gate/attempt-1/subjects/s0/checkpoints"
    deadline = time.time() + 400
    while not complete_steps(str(retrain)):
        assert driver.poll() is None and time.time() < deadline, "the driver ended before the retrain checkpointed"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    checkpoint = complete_steps(str(retrain))[-1]
    assert RunDirectory(str(run)).read_status("s0").gate is None  # killed mid-round: nothing recorded yet

    assert main(args) == 0
    status = RunDirectory(str(run)).read_status("s0")
    assert status.state == "below_gate" and len(status.gate["attempts"]) == 2
    retrained = RunDirectory(str(run / "gate/attempt-1")).read_status("s0")
    final = [h for h in retrained.history if h["stage"] == "train" and h["ok"]]
    assert len(final) == 1 and (final[0]["resumed_from"] or 0) >= checkpoint  # only the in-flight steps were lost
    assert final[0]["steps_run"] == 30 - (final[0]["resumed_from"] or 0)
    # RUN holds the kept attempt, each image's row once in each of its tables.
    kept = run / "gate/attempt-1" if status.gate["kept"] == 1 else run / "gate/attempt-0"
    assert status.gate.get("installed", False) == (status.gate["kept"] == 1)
    ids = sorted(pq.read_table(run / "generations.parquet").column("id").to_pylist())
    assert len(set(ids)) == len(ids) == 2
    for table in ("moderation.parquet", "evaluation.parquet"):
        assert sorted(pq.read_table(run / table).column("id").to_pylist()) == ids, table
    if status.gate["kept"] == 1:
        for image in (run / "subjects/s0/images").glob("*.png"):
            assert image.read_bytes() == (kept / "subjects/s0/images" / image.name).read_bytes()
        assert status.evaluation["dino"] == status.gate["attempts"][1]["scores"]["dino"]
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    assert not list(run.rglob("*.checkpoint/*.pending.parquet"))


def test_a_subject_training_on_its_captions_is_retrained_on_them(ray_cluster, tmp_path):
    """A manifest has no per-photo prompts, so a caption-mode retrain curates its photos again rather than training
    without the captions (or refusing its settings)."""
    rows = make_subject_rows(tmp_path / "images", 1)
    rows[0]["prompts"] = ["a photo of sks ball on a table"]
    manifest, run = str(tmp_path / "subjects.parquet"), tmp_path / "run"
    write_subjects_manifest(manifest, rows)
    args = ["run", manifest, "--out", str(run), *TINY, "--set", "gate_min_dino=1.0", "--set", "curate=true",
            "--set", "instance_prompt_mode=caption", "--set", "moderation_threshold=1.01"]  # fmt: skip
    assert main(args) == 0
    status = RunDirectory(str(run)).read_status("s0")
    assert status.state == "below_gate" and len(status.gate["attempts"]) == 2
    retrain = pq.read_table(run / "gate/attempt-1/curation.parquet").to_pylist()
    assert len(retrain) == 3 and all(r["caption"] is not None for r in retrain)
