"""Data-parallel subjects on the fleet, through the `dreamfleet` CLI: one subject on two workers (DDP over gloo on
this CPU), beside an ordinary one; a rank killed mid-training; a subject asking for more ranks than the fleet has."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from engine import storage
from engine.diffusion.checkpoints import complete_steps
from ray_jobs.cli import main
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory
from tests.helpers.subjects import make_subject_rows

STEPS, INTERVAL = 12, 4
ARGS = ["--workers", "2", "--no-progress", "--set", f"max_train_steps={STEPS}",
        "--set", f"checkpointing_steps={INTERVAL}", "--set", "num_class_images=2"]  # fmt: skip


def _manifest(tmp_path: Path, data_parallel: int) -> str:
    wide, plain = make_subject_rows(tmp_path / "images", 2, classes=("ball",))
    wide.update(subject_id="wide", params=f'{{"data_parallel": {data_parallel}}}')
    plain.update(subject_id="plain", params='{"max_train_steps": 2, "with_prior_preservation": false}')
    manifest = str(tmp_path / "subjects.parquet")
    write_subjects_manifest(manifest, [wide, plain])
    return manifest


def _kill_a_rank_after_its_first_checkpoint(run: str, timeout: float = 300) -> tuple[int, int]:
    """SIGKILL rank 1's worker once the data-parallel subject has a checkpoint (not its last); returns the pid and
    the checkpoint's step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = RunDirectory(run).read_statuses().get("wide")
        steps = complete_steps(storage.join(run, "subjects", "wide", "checkpoints"))
        if status is not None and status.state == "training" and steps and steps[-1] < STEPS:
            pid = status.worker["ranks"][1]["pid"]
            os.kill(pid, signal.SIGKILL)
            return pid, steps[-1]
        time.sleep(0.05)
    raise AssertionError("the data-parallel subject was never seen training with a checkpoint")


def test_a_data_parallel_subject_trains_on_two_workers_and_survives_a_killed_rank(ray_cluster, tmp_path):
    run = str(tmp_path / "run")
    # One attempt only: a rank killed after the subject checkpointed does not use it up.
    args = ["train", _manifest(tmp_path, data_parallel=2), "--out", run, *ARGS, "--set", "max_attempts=1"]
    result = {}
    driver = threading.Thread(target=lambda: result.setdefault("code", main(args)))
    driver.start()
    killed, checkpoint_at_kill = _kill_a_rank_after_its_first_checkpoint(run)
    driver.join(timeout=300)

    assert result["code"] == 0
    statuses = RunDirectory(run).read_statuses()
    assert {sid: s.state for sid, s in statuses.items()} == {"wide": "trained", "plain": "trained"}
    lost, kept = statuses["wide"].history
    assert not lost["ok"] and "worker process died: rank 1 of 2" in lost["error"]
    assert [w["pid"] for w in lost["workers"]][1] == killed
    # It resumed from the checkpoint that existed at the kill (or a newer one) and ran only the steps left.
    assert kept["ok"] and kept["resumed_from"] >= checkpoint_at_kill > 0
    assert kept["steps_run"] == STEPS - kept["resumed_from"]
    # Both ranks' workers are in its history; the surviving rank left the group and served the retry.
    pids = [w["pid"] for w in kept["workers"]]
    assert len(set(pids)) == 2 and killed not in pids and lost["workers"][0]["pid"] in pids
    assert len(statuses["plain"].history) == 1 and statuses["plain"].history[0]["ok"]
    for sid in ("wide", "plain"):
        assert (Path(run) / "subjects" / sid / "weights" / "pytorch_lora_weights.safetensors").exists()
    log = (Path(run) / "subjects" / "wide" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == STEPS


def test_a_subject_wider_than_the_fleet_fails_at_once_and_the_others_train(ray_cluster, tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", _manifest(tmp_path, data_parallel=3), "--out", run, *ARGS]) == 1
    statuses = RunDirectory(run).read_statuses()
    assert statuses["plain"].state == "trained"
    wide = statuses["wide"]
    assert wide.state == "failed" and wide.error == "data_parallel=3 needs 3 workers; this fleet has 2"
    assert wide.attempts == 0 and not (Path(run) / "class_images").exists()  # nothing was made for it
