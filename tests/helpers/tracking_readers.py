"""What a tracked RUN looks like through each tool's own reader: MLflow's client, W&B's transaction-log reader
(`wandb leet inspect`) over offline runs, TensorBoard's EventAccumulator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.tracking import SCALARS


def mlflow_children(tracking_uri: str, run_uri: str) -> dict[str, object]:
    """RUN's parent run (there is one) and its child runs, by subject id (one each)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("dreamfleet")
    parents = client.search_runs([experiment.experiment_id], f"tags.`dreamfleet.run` = '{run_uri}' and tags.`dreamfleet.role` = 'run'")
    assert len(parents) == 1
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    by_subject = {run.data.tags["dreamfleet.subject_id"]: run for run in children}
    assert len(by_subject) == len(children)  # one child run per subject, however often it was opened
    return by_subject


def mlflow_curves(tracking_uri: str, run_id: str) -> dict[str, list[int]]:
    """The steps of each training curve of a run, as logged (a step logged twice shows twice)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return {tag: [m.step for m in client.get_metric_history(run_id, tag)] for tag in SCALARS}


def wandb_sessions(wandb_dir: Path) -> list[dict]:
    """Every offline session, as W&B's own transaction-log reader (`wandb leet inspect --json`) reads it."""
    folders = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    readers = [subprocess.Popen([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(f)],
                                stdout=subprocess.PIPE, text=True) for f in folders]  # fmt: skip
    sessions = []
    for reader in readers:
        out, _ = reader.communicate(timeout=60)
        assert reader.returncode == 0
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        run = next(r["run"] for r in records if r["type"] == "run")
        exit_code = next(r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit")
        sessions.append({"run": run, "history": [r["history"]["item"] for r in records if r["type"] == "history"],
                         "exit_code": exit_code})  # fmt: skip
    return sessions


def tensorboard_events(subject_dir: str):
    """Everything in a subject's TensorBoard folder, every event kept (no sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "images": 0, "tensors": 0}
    return EventAccumulator(f"{subject_dir}/tensorboard", size_guidance=guidance).Reload()


def tensorboard_hparams(accumulator) -> dict:
    """The HParams tab's values of one subject."""
    from tensorboard.plugins.hparams import metadata

    content = accumulator.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    return dict(metadata.parse_session_start_info_plugin_data(content).hparams)
