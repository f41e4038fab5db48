"""Experiment tracking through the fleet: `dreamfleet train` then `generate` with every tracker, configured by
environment variables set after the local cluster started, read back with each tool's own reader."""

from __future__ import annotations

from pathlib import Path

from engine.tracking import SCALARS, wandb_run_id
from ray_jobs.cli import main
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory
from tests.helpers.services import free_port
from tests.helpers.subjects import make_subject_rows
from tests.helpers.tracking_readers import (
    mlflow_children,
    mlflow_curves,
    tensorboard_events,
    wandb_sessions,
)

STEPS = 4
ARGS = ["--workers", "1", "--no-progress", "--set", f"max_train_steps={STEPS}", "--set", "checkpointing_steps=2",
        "--set", "num_class_images=2", "--set", "num_images_per_prompt=1",
        "--set", "trackers=[tensorboard, mlflow, wandb]"]  # fmt: skip


def test_each_tool_sees_every_subject_of_the_run_and_a_tool_that_is_down_is_in_the_history(
    ray_cluster, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts of a SQLite store go under the working directory
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    rows = make_subject_rows(tmp_path / "images", 2, classes=("ball",))
    for row in rows:
        row["prompts"] = [f"a photo of sks ball on the moon ({row['subject_id']})"]
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)

    assert main(["train", manifest, "--out", run, *ARGS]) == 0
    # The MLflow server is down by the time the images are made: generation goes on, the history says why.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main(["generate", manifest, "--out", run, *ARGS]) == 0
    assert "warning: experiment tracking: mlflow is off for this run: MlflowException" in capsys.readouterr().err

    statuses = RunDirectory(run).read_statuses()
    assert {s.state for s in statuses.values()} == {"done"}
    for status in statuses.values():
        train, generate = status.history
        assert "tracker_errors" not in train
        assert [e.split(":")[:2] for e in generate["tracker_errors"]] == [["mlflow", " MlflowException"]]

    every_step = list(range(1, STEPS + 1))
    children = mlflow_children(store, run)  # the RUN's parent run, a child per subject
    assert sorted(children) == ["s0", "s1"]
    for child in children.values():
        assert child.info.status == "FINISHED" and child.data.params["max_train_steps"] == str(STEPS)
        assert mlflow_curves(store, child.info.run_id) == {tag: every_step for tag in SCALARS}

    sessions = wandb_sessions(tmp_path)
    for sid in ("s0", "s1"):
        mine = [s for s in sessions if s["run"]["run_id"] == wandb_run_id(run, sid)]
        assert len(mine) == 2  # the worker's training session, then the generation's
        assert {(s["run"]["run_group"], s["run"]["project"], s["run"]["display_name"]) for s in mine} == {(run, "dreamfleet", sid)}
        history = [item for s in mine for item in s["history"]]
        for tag in SCALARS:
            assert [item["_step"] for item in history if tag in item] == every_step
        assert [item["generated/prompt_0.captions"] for item in history if "generated/prompt_0.count" in item] == [
            [f"a photo of sks ball on the moon ({sid})"]
        ]

    for sid in ("s0", "s1"):  # `tensorboard --logdir RUN` shows RUN/subjects/<id>/tensorboard
        events = tensorboard_events(str(Path(run) / "subjects" / sid))
        for tag in SCALARS:
            assert [e.step for e in events.Scalars(tag)] == every_step
        assert [e.step for e in events.Images("generated/prompt_0")] == [0]
