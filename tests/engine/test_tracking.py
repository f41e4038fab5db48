"""Experiment tracking of a real pack of tiny subjects, read back with each tool's own reader: MLflow's client over a
SQLite store, W&B's transaction-log reader over offline runs, TensorBoard's EventAccumulator over RUN."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from engine.diffusion.class_images import ClassImageCache
from engine.diffusion.subject import Subject
from engine.diffusion.train import PackTrainer
from engine.settings import load_settings
from engine.tracking import (
    SCALARS,
    SubjectTracker,
    TrackingGroup,
    start_group,
    wandb_run_id,
)
from tests.helpers.subjects import draw_subject
from tests.helpers.tracking_readers import (
    mlflow_children,
    mlflow_curves,
    tensorboard_events,
    tensorboard_hparams,
    wandb_sessions,
)  # fmt: skip
from tests.helpers.training import Interrupted

TRACKERS = ("tensorboard", "mlflow", "wandb")
STEPS = 4
PROMPTS = ("a photo of sks ball on the moon", "a photo of sks ball in a box")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow SQLite store for the module (creating its tables takes seconds); each test has its own RUN in it."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def class_uris(base, tmp_path_factory) -> list[str]:
    settings = load_settings("tiny", overrides={"num_class_images": 2})
    return ClassImageCache(str(tmp_path_factory.mktemp("class_images"))).ensure(base, "a photo of a ball", settings).uris


@pytest.fixture
def tools(tmp_path, store, monkeypatch) -> Path:
    """The tools configured as their users configure them: MLflow's store shared by the module, the rest in tmp_path."""
    monkeypatch.chdir(store)  # MLflow puts a SQLite store's artifacts under the working directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "tracking-test")
    return tmp_path


def _jobs(tmp_path: Path, run: Path, class_uris: list[str]) -> list[tuple[Subject, object, str, list[str]]]:
    settings = load_settings("tiny", overrides={"max_train_steps": STEPS, "checkpointing_steps": 2, "num_class_images": 2,
                                                "trackers": list(TRACKERS)})  # fmt: skip
    jobs = []
    for i, sid in enumerate(("a", "b")):
        folder = tmp_path / "images" / sid
        folder.mkdir(parents=True, exist_ok=True)
        images = tuple(str(draw_subject(folder / f"{k}.png", shift=i + k)) for k in range(2))
        subject = Subject(sid, images, "a photo of sks ball", "a photo of a ball", seed=10 + i)
        jobs.append((subject, settings, str(run / "subjects" / sid), class_uris))
    return jobs


def _train_tracked(base, jobs, group: TrackingGroup, stop: tuple[str, int] | None = None) -> dict[str, list[str]]:
    """The pack trained as a fleet worker trains it, each subject tracked from its admission to its end; `stop`
    (subject, step) kills the pack there. Returns each subject's tracker errors."""
    trackers: dict[str, SubjectTracker] = {}
    errors: dict[str, list[str]] = {}

    def on_step(sid):
        def stepped(record):
            trackers[sid].log_step(record)
            if (sid, record.step) == stop:
                raise Interrupted

        return stepped

    trainer = PackTrainer(base, jobs[0][1], capacity=len(jobs))
    try:
        for subject, settings, folder, class_uris in jobs:
            member = trainer.admit(subject, settings, folder, class_uris, on_step(subject.subject_id))
            trackers[subject.subject_id] = SubjectTracker(group, subject.subject_id, settings, folder, member.step)
        while trainer.members:
            for ended in trainer.step():
                assert ended.error is None
                errors[ended.subject.subject_id] = trackers.pop(ended.subject.subject_id).close(ok=True)
    finally:
        for sid, tracker in trackers.items():  # the pack died: its residents' runs end as failed
            errors[sid] = tracker.close(ok=False)
        trainer.close()
    return errors


def _generated_rows(subject_dir: str) -> list[dict]:
    """Images as the generation stage leaves them (rows of generations.parquet), two per prompt."""
    rows = []
    for p, prompt in enumerate(PROMPTS):
        for i in range(2):
            uri = f"{subject_dir}/images/p{p:04d}-i{i:04d}.png"
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (40 * p, 100 * i, 200)).save(uri)
            rows.append({"prompt": prompt, "prompt_index": p, "image_index": i, "image": uri})
    return rows


# -- tests ------------------------------------------------------------------------------------------------------


def test_each_tool_sees_every_subjects_run_through_a_resume_with_its_curves_settings_and_images(
    base, tools, store, class_uris
):
    """One pack killed mid-training, resumed by a rerun, then its images: the tests of a clean run and of a resumed
    one in one, as each tracked pack costs CI seconds."""
    run = tools / "run"
    jobs = _jobs(tools, run, class_uris)
    group = start_group(str(run), TRACKERS)
    assert group.failed == {}
    with pytest.raises(Interrupted):  # the pack dies at a's step 3: both checkpointed at 2, b stepped to 2 only
        _train_tracked(base, jobs, group, stop=("a", 3))
    again = start_group(str(run), TRACKERS)  # the rerun's driver finds the RUN's parent run again
    assert again.mlflow_parent_run_id == group.mlflow_parent_run_id
    errors = _train_tracked(base, jobs, again)  # both resume from step 2; a's step 3 is trained again
    for _, settings, folder, _ in jobs:  # the generation stage: a session of its own, as on a fleet worker
        sid = folder.rsplit("/", 1)[-1]
        tracker = SubjectTracker(again, sid, settings, folder)
        tracker.log_images(_generated_rows(folder))
        errors[sid] += tracker.close()
    assert errors == {"a": [], "b": []}
    every_step = list(range(1, STEPS + 1))

    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{store}/mlflow.db"
    client = MlflowClient(tracking_uri)
    children = mlflow_children(tracking_uri, str(run))
    assert sorted(children) == ["a", "b"]  # one child each, continued by the resumed session and the generation
    for sid, child in children.items():
        assert child.info.run_name == sid and child.info.status == "FINISHED"
        assert child.data.tags["dreamfleet.run"] == str(run)
        assert child.data.params["max_train_steps"] == str(STEPS) and child.data.params["learning_rate"] == "0.005"
        assert mlflow_curves(tracking_uri, child.info.run_id) == {tag: every_step for tag in SCALARS}  # each once
        assert child.data.metrics["train/prior_loss"] > 0  # prior preservation is on: its own curve
        files = sorted(f.path for f in client.list_artifacts(child.info.run_id, "generated"))
        assert files == ["generated/p0000-i0000.png", "generated/p0000-i0001.png", "generated/p0001-i0000.png",
                         "generated/p0001-i0001.png", "generated/prompts.json"]  # fmt: skip
        prompts = Path(client.download_artifacts(child.info.run_id, "generated/prompts.json", str(tools / sid)))
        assert json.loads(prompts.read_text())["p0001-i0000.png"] == PROMPTS[1]

    sessions = wandb_sessions(tools)
    for sid in ("a", "b"):
        mine = [s for s in sessions if s["run"]["display_name"] == sid]
        assert len(mine) == 3  # killed, resumed, generation: one W&B run
        assert {s["run"]["run_id"] for s in mine} == {wandb_run_id(str(run), sid)}
        assert sorted(s["exit_code"] for s in mine) == [0, 0, 1]  # the killed session ended as failed
        for s in mine:
            assert s["run"]["run_group"] == str(run) and s["run"]["project"] == "tracking-test"
            assert s["run"]["tags"] == ["dreamfleet", sid]
            assert s["run"]["config"]["update"]["max_train_steps"] == STEPS
        history = [item for s in mine for item in s["history"]]
        for tag in SCALARS:  # offline, a session cannot know what an earlier one logged: a's step 3 is in two
            assert sorted({item["_step"] for item in history if tag in item}) == every_step
        shown = [item for item in history if "generated/prompt_1.count" in item]
        assert len(shown) == 1 and shown[0]["generated/prompt_1.captions"] == [PROMPTS[1]] * 2

    for _, _, folder, _ in jobs:
        sid = folder.rsplit("/", 1)[-1]
        assert len(list(Path(folder, "tensorboard").iterdir())) == 3  # each session's own event file
        events = tensorboard_events(folder)
        for tag in SCALARS:  # the redone step counts once: the resumed session purged what followed its checkpoint
            assert [e.step for e in events.Scalars(tag)] == every_step
        assert tensorboard_hparams(events)["max_train_steps"].number_value == STEPS
        assert f"subject `{sid}`" in events.Tensors("dreamfleet/text_summary")[0].tensor_proto.string_val[0].decode()
        assert [(e.step, e.width) for e in events.Images("generated/prompt_0")] == [(0, 16), (1, 16)]
        assert events.Tensors("prompts/prompt_1/text_summary")[0].tensor_proto.string_val[0].decode() == PROMPTS[1]


def test_a_tracker_that_fails_is_reported_and_the_training_finishes(base, tools, class_uris, monkeypatch):
    from tests.helpers.services import free_port

    down = f"http://127.0.0.1:{free_port()}"  # an MLflow server that is not running
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = tools / "run"
    jobs = _jobs(tools, run, class_uris)[:1]

    group = start_group(str(run), ("mlflow", "tensorboard"))  # the driver cannot start the RUN's parent run
    assert group.failed["mlflow"].startswith("MlflowException: API request to")
    assert SubjectTracker(group, "a", jobs[0][1], jobs[0][2], 0).close() == [f"mlflow: {group.failed['mlflow']}"]

    # The driver reached MLflow but the worker does not: the first failing call drops MLflow for that subject alone.
    worker_side = dataclasses.replace(group, failed={}, mlflow_tracking_uri=down, mlflow_experiment_id="1",
                                      mlflow_parent_run_id="0" * 32)  # fmt: skip
    errors = _train_tracked(base, jobs, worker_side)
    assert len(errors["a"]) == 1 and errors["a"][0].startswith("mlflow: MlflowException: API request to")
    folder = jobs[0][2]  # trained, and still tracked by the tool that works
    assert Path(folder, "weights", "pytorch_lora_weights.safetensors").exists()
    assert [e.step for e in tensorboard_events(folder).Scalars("train/loss")] == list(range(1, STEPS + 1))
