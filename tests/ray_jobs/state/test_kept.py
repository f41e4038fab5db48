"""A kept retrain put in place without Ray: RUN/subjects/<id> and RUN's tables end holding the retrain's results,
the first attempt's are in RUN/gate/attempt-0/, and a kill at any write of the swap, then a rerun, ends exactly
as a swap that was never interrupted."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import storage
from engine.settings import load_settings
from ray_jobs.gate import _record
from ray_jobs.state.gate import attempt
from ray_jobs.state.kept import mirror
from ray_jobs.state.run_dir import RunDirectory, SubjectStatus

SETTINGS = load_settings("tiny", overrides={"gate_min_dino": 0.5})


class Killed(BaseException):
    """What a SIGKILL at that write would leave: everything before it, nothing after."""


def _attempt_run(folder: Path, tag: str, dino: float) -> None:
    """A run directory with s0's results (files and table rows marked `tag`) and s1's untouched ones."""
    run = RunDirectory(str(folder))
    for sid in ("s0", "s1"):
        subject = folder / "subjects" / sid
        (subject / "weights").mkdir(parents=True)
        (subject / "weights" / "lora.safetensors").write_text(f"{tag} weights of {sid}")
        (subject / "images").mkdir()
        images = [str(subject / "images" / f"p0-{k}.png") for k in range(2)]
        for image in images:
            Path(image).write_text(f"{tag} image")
        (subject / "train_log.jsonl").write_text(f'{{"step": 1, "tag": "{tag}"}}\n')
        pq.write_table(pa.table({"id": [f"{sid}/p0-{k}" for k in range(2)], "image": images}),
                       subject / "generations.parquet")  # fmt: skip
        run.write_status(SubjectStatus(sid, state="done", evaluation={"dino": dino, "images": 2}))
    if tag == "first":  # only RUN's attempt had a checkpoint left: it must leave RUN's folder with the attempt
        (folder / "subjects/s0/checkpoints/step-1").mkdir(parents=True)
        (folder / "subjects/s0/checkpoints/step-1/state.json").write_text("{}")
    ids = [f"{sid}/p0-{k}" for sid in ("s0", "s1") for k in range(2)]
    images = [str(folder / "subjects" / i.split("/")[0] / "images" / f"{i.split('/')[1]}.png") for i in ids]
    for table, column in (("moderation.parquet", "safe"), ("evaluation.parquet", "dino")):
        (folder / table).mkdir()
        for part in range(2):  # each part holds one row of each subject
            rows = slice(part, None, 2)
            pq.write_table(pa.table({"id": ids[rows], "image": images[rows], column: [tag] * 2}),
                           folder / table / f"part-{part}-0.parquet")  # fmt: skip


def _contents(folder: Path) -> dict[str, object]:
    """Every file's content (a table's rows; a status's scores and gate record) by its path under `folder`."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if path.suffix == ".parquet":
            found[name] = sorted(pq.read_table(path).to_pylist(), key=lambda r: r["id"])
        elif path.name == "status.json":
            status = storage.read_json(str(path))
            found[name] = (status["state"], status["evaluation"], status["gate"])
        else:
            found[name] = path.read_text()
    return found


def _swap(run: Path) -> str:
    attempts = [attempt(0, str(run), {}, {"dino": 0.2}, SETTINGS),
                attempt(1, str(run / "gate/attempt-1"), {"max_train_steps": 6}, {"dino": 0.6}, SETTINGS)]  # fmt: skip
    return _record(RunDirectory(str(run)), "s0", attempts, {"dino": 0.5})


@pytest.fixture
def fresh(tmp_path):
    def make(name: str) -> Path:
        _attempt_run(tmp_path / name, "first", 0.2)
        _attempt_run(tmp_path / name / "gate/attempt-1", "retrain", 0.6)
        return tmp_path / name

    return make


def test_the_kept_retrain_is_put_in_place_and_the_first_attempt_archived(fresh):
    run = fresh("run")
    assert _swap(run) == "done"
    subject = run / "subjects/s0"
    assert (subject / "weights/lora.safetensors").read_text() == "retrain weights of s0"
    assert (subject / "images/p0-0.png").read_text() == "retrain image" and not (subject / "checkpoints").exists()
    generations = pq.read_table(subject / "generations.parquet").column("image").to_pylist()
    assert all(p.startswith(str(subject / "images")) for p in generations)
    for table, column in (("moderation.parquet", "safe"), ("evaluation.parquet", "dino")):
        rows = pa.concat_tables([pq.read_table(p) for p in sorted((run / table).glob("*.parquet"))]).to_pylist()
        assert sorted(r["id"] for r in rows) == ["s0/p0-0", "s0/p0-1", "s1/p0-0", "s1/p0-1"]  # each once
        assert {r["id"]: r[column] for r in rows if r["id"].startswith("s0/")} == {"s0/p0-0": "retrain",
                                                                                     "s0/p0-1": "retrain"}  # fmt: skip
        assert {r[column] for r in rows if r["id"].startswith("s1/")} == {"first"}
        assert all(r["image"].startswith(str(run / "subjects" / r["id"].split("/")[0])) for r in rows)
    archive = run / "gate/attempt-0/subjects/s0"
    assert (archive / "weights/lora.safetensors").read_text() == "first weights of s0"
    assert (archive / "checkpoints/step-1/state.json").exists()
    assert {r["safe"] for r in pq.read_table(archive / "moderation.parquet").to_pylist()} == {"first"}
    assert all(p.startswith(str(archive)) for p in pq.read_table(archive / "evaluation.parquet")["image"].to_pylist())
    status = RunDirectory(str(run)).read_status("s0")
    assert status.gate["installed"] and status.gate["kept"] == 1 and status.evaluation["dino"] == 0.6
    assert status.gate["kept_subject"] == str(subject) and status.gate["attempts"][0]["subject"] == str(archive)
    assert [a["params"] for a in status.gate["attempts"]] == [{}, {"max_train_steps": 6}]
    # The retrain's own run directory is untouched.
    assert (run / "gate/attempt-1/subjects/s0/weights/lora.safetensors").read_text() == "retrain weights of s0"
    before = _contents(run)
    assert _swap(run) == "done" and _contents(run) == before  # a rerun changes nothing


def test_a_kill_at_any_write_of_the_swap_and_a_rerun_end_as_an_uninterrupted_swap(fresh, monkeypatch):
    clean = fresh("clean")
    _swap(clean)
    expected = _contents(clean)
    writes = {"count": 0, "kill_at": None}

    def killable(fn):
        def call(*args, **kwargs):
            writes["count"] += 1
            if writes["count"] == writes["kill_at"]:
                raise Killed
            return fn(*args, **kwargs)

        return call

    for name in ("write_bytes", "put_file", "remove"):
        monkeypatch.setattr(storage, name, killable(getattr(storage, name)))
    counted = fresh("counted")
    writes["count"] = 0
    _swap(counted)
    total = writes["count"]
    assert total > 10
    for kill_at in range(1, total + 1):
        run = fresh(f"killed-{kill_at}")  # its own writes are counted too: the count starts after them
        writes.update(count=0, kill_at=kill_at)
        with pytest.raises(Killed):
            _swap(run)
        writes["kill_at"] = None
        assert _swap(run) == "done"
        assert _normalised(_contents(run), run) == _normalised(expected, clean), f"killed at write {kill_at}"


def _normalised(contents: dict[str, object], root: Path) -> str:
    return repr(contents).replace(str(root), "RUN")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_folder_or_file_is_mirrored_exactly_on_a_disk_and_an_object_store(where, request, tmp_path):
    """What the swap copies with: each file copied whole (server-side within one bucket), what the source lacks
    removed, nothing at the source left nothing at the target."""
    if where == "local":
        root = str(tmp_path)
    else:
        request.getfixturevalue("s3_endpoint")
        bucket = f"kept-{uuid.uuid4().hex[:12]}"
        storage.filesystem(f"s3://{bucket}")[0].mkdir(bucket)
        root = f"s3://{bucket}"
    source, target = storage.join(root, "attempt"), storage.join(root, "run")
    storage.write_bytes(storage.join(source, "weights/lora.safetensors"), b"retrain")
    storage.write_bytes(storage.join(source, "weights/text_encoder/config.json"), b"{}")
    storage.write_bytes(storage.join(source, "train_log.jsonl"), b"log")
    storage.write_bytes(storage.join(target, "weights/lora.safetensors"), b"first")
    storage.write_bytes(storage.join(target, "weights/unet.safetensors"), b"first, another layout")
    mirror(storage.join(source, "weights"), storage.join(target, "weights"))
    assert storage.find(storage.join(target, "weights")) == ["lora.safetensors", "text_encoder/config.json"]
    assert storage.read_bytes(storage.join(target, "weights/lora.safetensors")) == b"retrain"
    mirror(storage.join(source, "train_log.jsonl"), storage.join(target, "train_log.jsonl"))
    assert storage.read_bytes(storage.join(target, "train_log.jsonl")) == b"log"
    mirror(storage.join(source, "checkpoints"), storage.join(target, "weights"))  # none there: none here
    assert storage.find(storage.join(target, "weights")) == [] and storage.find(storage.join(source, "weights"))
