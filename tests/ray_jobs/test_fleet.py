"""The fleet end to end on a local Ray cluster with logical GPUs, through the `dreamfleet` CLI as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from engine import storage
from ray_jobs.cli import main
from ray_jobs.manifest import write_subjects_manifest
from ray_jobs.run_dir import RunDirectory
from tests.ray_jobs.conftest import make_subject_rows

pytestmark = pytest.mark.slow

FAST = ["--set", "max_train_steps=12", "--set", "checkpointing_steps=4", "--set", "num_class_images=2", "--no-progress"]


def _statuses(run: str) -> dict:
    return {k: v.__dict__ for k, v in RunDirectory(run).read_statuses().items()}


def test_subjects_are_sharded_packed_and_bad_rows_fail_alone(ray_cluster, tmp_path, capsys):
    rows = make_subject_rows(tmp_path / "images", 6)
    rows.append({**rows[0], "subject_id": "missing-image", "instance_images": [str(tmp_path / "nope.png")]})
    rows.append({**rows[1], "subject_id": "bad-params", "params": '{"lora_rnk": 4}'})
    rows.append({**rows[1], "subject_id": "s0"})  # duplicate id: rejected, and s0 itself still trains
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)

    code = main(["train", manifest, "--out", run, "--gpus-per-job", "0.5", *FAST])

    assert code == 1  # finished, but some subjects failed
    statuses = _statuses(run)
    assert Counter(s["state"] for s in statuses.values()) == {"trained": 6, "failed": 2}
    assert "missing-image" in statuses and "nope.png: no such file" in statuses["missing-image"]["error"]
    assert statuses["missing-image"]["attempts"] == 1  # a missing file is not retried
    assert "unknown setting(s) 'lora_rnk'" in statuses["bad-params"]["error"]
    rejected = RunDirectory(run).read_rejected_rows()
    assert [r["subject_id"] for r in rejected] == ["s0"] and "duplicate subject_id" in rejected[0]["reason"]

    # Two class prompts: two class sets, each generated once, on whichever worker got it.
    class_sets = sorted(p.name for p in (Path(run) / "class_images").iterdir())
    assert len(class_sets) == 2 and all(len(list((Path(run) / "class_images" / c).glob("*.png"))) == 2 for c in class_sets)

    # 2 logical GPUs at 0.5 each: four workers, two per GPU id.
    workers = {s["worker"]["pid"]: tuple(s["worker"]["gpu_ids"]) for s in statuses.values() if s["worker"]}
    assert len(workers) == 4 and Counter(workers.values()) == {(0,): 2, (1,): 2}
    for sid in (f"s{i}" for i in range(6)):
        assert (Path(run) / "subjects" / sid / "weights" / "pytorch_lora_weights.safetensors").exists()

    assert main(["status", run]) == 0
    out = capsys.readouterr().out
    assert "missing-image" in out and "duplicate subject_id" in out

    # The same command again: nothing is trained twice, the failures are tried once more.
    before = {sid: s["history"] for sid, s in statuses.items() if s["state"] == "trained"}
    assert main(["train", manifest, "--out", run, "--gpus-per-job", "0.5", *FAST]) == 1
    after = _statuses(run)
    assert {sid: after[sid]["history"] for sid in before} == before
    assert after["missing-image"]["attempts"] == 2


def test_a_run_with_other_settings_is_refused(ray_cluster, tmp_path, capsys):
    manifest, run = str(tmp_path / "m.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, make_subject_rows(tmp_path / "images", 1))
    assert main(["train", manifest, "--out", run, *FAST]) == 0
    assert main(["train", manifest, "--out", run, *FAST, "--set", "lora_rank=2"]) == 2
    assert "other settings (lora_rank: 8 -> 2)" in capsys.readouterr().err


def test_a_killed_worker_loses_nothing(ray_cluster, tmp_path):
    rows = make_subject_rows(tmp_path / "images", 4)
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)
    args = ["train", manifest, "--out", run, "--gpus-per-job", "0.5", "--no-progress",
            "--set", "max_train_steps=200", "--set", "checkpointing_steps=20", "--set", "num_class_images=2",
            # One attempt only: a worker killed after its subject checkpointed does not use the attempt up.
            "--set", "max_attempts=1"]  # fmt: skip
    result = {}
    driver = threading.Thread(target=lambda: result.setdefault("code", main(args)))
    driver.start()

    victim, checkpoint_at_kill = _kill_a_worker_mid_training(run)
    driver.join(timeout=600)

    assert result["code"] == 0
    statuses = _statuses(run)
    assert all(s["state"] == "trained" for s in statuses.values())
    history = statuses[victim]["history"]
    assert "worker process died" in history[0]["error"]
    assert [h["ok"] for h in history] == [False, True]  # trained exactly once, after one lost attempt
    # It resumed from the checkpoint that existed when its worker was killed (or a newer one): at most one
    # checkpoint interval (20 steps) of work was redone.
    assert history[1]["resumed_from"] >= checkpoint_at_kill > 0
    assert history[1]["steps_run"] == 200 - history[1]["resumed_from"]


def _kill_a_worker_mid_training(run: str, timeout: float = 300) -> tuple[str, int]:
    """SIGKILL the worker of the first subject found training with a checkpoint; returns it and that step."""
    from engine.checkpoints import complete_steps

    deadline = time.time() + timeout
    while time.time() < deadline:
        for sid, status in _statuses(run).items():
            steps = complete_steps(storage.join(run, "subjects", sid, "checkpoints"))
            if status["state"] == "training" and status["worker"] and steps and steps[-1] < 180:
                os.kill(status["worker"]["pid"], signal.SIGKILL)
                return sid, steps[-1]
        time.sleep(0.05)
    raise AssertionError("no subject was seen training with a checkpoint")


def test_an_s3_run_behaves_like_a_local_one(ray_cluster, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("dreamfleet-test")
    rows = make_subject_rows(tmp_path / "images", 2)
    for row in rows:  # the images live in the bucket too
        uris = []
        for path in row["instance_images"]:
            uri = f"s3://dreamfleet-test/images/{row['subject_id']}/{Path(path).name}"
            storage.write_bytes(uri, Path(path).read_bytes())
            uris.append(uri)
        row["instance_images"] = uris
    manifest, run = "s3://dreamfleet-test/subjects.parquet", "s3://dreamfleet-test/runs/one"
    write_subjects_manifest(manifest, rows)

    assert main(["train", manifest, "--out", run, *FAST]) == 0
    assert {s["state"] for s in _statuses(run).values()} == {"trained"}
    assert storage.exists(f"{run}/subjects/s1/weights/pytorch_lora_weights.safetensors")
    record = json.loads(storage.read_bytes(f"{run}/run.json"))
    assert record["manifest"] == manifest and record["invocations"][-1]["summary"]["trained"] == 2


def test_run_generates_every_trained_subject_exactly_once(ray_cluster, tmp_path, capsys):
    import pyarrow.parquet as pq

    rows = make_subject_rows(tmp_path / "images", 3)
    for row in rows:
        row.update(prompts=["a photo of sks thing at the beach", "a photo of sks thing in a box"], owner="team-a")
    rows.append({**rows[0], "subject_id": "broken", "instance_images": [str(tmp_path / "nope.png")]})
    rows.append({**rows[1], "subject_id": "no-prompts", "prompts": []})
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)
    args = ["run", manifest, "--out", run, "--workers", "2", *FAST, "--set", "num_images_per_prompt=2"]

    assert main(args) == 1  # "broken" failed; everything else finished
    statuses = _statuses(run)
    assert {sid: s["state"] for sid, s in statuses.items()} == {
        "s0": "done", "s1": "done", "s2": "done", "no-prompts": "done", "broken": "failed",
    }  # fmt: skip
    assert not (Path(run) / "subjects" / "broken" / "images").exists()  # never generated
    table = pq.read_table(Path(run) / "generations.parquet").to_pylist()
    assert len(table) == 3 * 2 * 2
    assert len({(r["subject_id"], r["prompt_index"], r["image_index"]) for r in table}) == len(table)
    assert all(Path(r["image"]).is_file() and r["owner"] == "team-a" for r in table)
    assert {r["scheduler"] for r in table} == {"ddim"} and {r["num_inference_steps"] for r in table} == {10}

    stamps = {r["image"]: os.stat(r["image"]).st_mtime_ns for r in table}
    assert main(args) == 1  # the same command again: nothing redone, nothing duplicated
    again = pq.read_table(Path(run) / "generations.parquet").to_pylist()
    assert again == table and {r["image"]: os.stat(r["image"]).st_mtime_ns for r in again} == stamps
    assert not list(Path(run).rglob("*.tmp-*"))

    fresh = str(tmp_path / "fresh")
    assert main(["generate", manifest, "--out", fresh, *FAST]) == 1
    assert "not trained yet" in capsys.readouterr().out
