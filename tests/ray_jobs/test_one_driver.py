"""One driver per RUN and per pass output, through the command line: while a command writes a RUN (or an OUT), every
other command that would write it exits 2 at once naming the holder and its lease's age, and the one that runs writes
every row once. `status` and `report` read a held RUN freely."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_jobs.cli import main
from ray_jobs.state.lease import output_lease_uri, read_holder, run_lease_uri
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory
from tests.helpers.subjects import make_subject_rows

FAST = ["--no-progress", "--set", "max_train_steps=6", "--set", "checkpointing_steps=3", "--set", "num_class_images=2"]


def _in_background(argv: list[str], lease: str) -> tuple[threading.Thread, list[int]]:
    """`dreamfleet argv` on a thread of this process (sharing the test's Ray cluster), once it holds `lease`."""
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while (holder := read_holder(lease)) is None or holder.released is not None:
        assert thread.is_alive() and time.monotonic() < deadline, f"{argv[0]} never took its lease"
        time.sleep(0.01)
    return thread, codes


def _refused(argv: list[str], capsys, holder_command: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert f"is held by another driver: host {socket.gethostname()} pid {os.getpid()}" in err, err
    assert f"`{holder_command}" in err and "s ago" in err, err


@pytest.mark.slow
def test_a_second_driver_exits_2_naming_the_holder_and_the_first_writes_every_row_once(ray_cluster, tmp_path,
                                                                                        capsys):  # fmt: skip
    rows = make_subject_rows(tmp_path / "images", 2)
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)

    first, codes = _in_background(["train", manifest, "--out", run, *FAST], run_lease_uri(run))
    for argv in (["train", manifest, "--out", run], ["generate", manifest, "--out", run],
                 ["run", manifest, "--out", run], ["evaluate", run],
                 ["analyze", manifest, "--task", "moderate", "--out", f"{run}/moderation.parquet"]):  # fmt: skip
        _refused([*argv, "--no-progress"], capsys, f"dreamfleet train {manifest} --out {run}")
    while not (Path(run) / "run.json").exists() and first.is_alive():
        time.sleep(0.05)
    assert main(["status", run]) == 0  # readers take no lease
    first.join()
    assert codes == [0]
    statuses = RunDirectory(run).read_statuses()
    for status in statuses.values():  # one attempt, in the history once (two drivers made it 2 attempts, 1 entry)
        assert status.state == "trained" and status.attempts == len(status.history) == 1, status
    assert len(RunDirectory(run).read_run()["invocations"]) == 1
    assert read_holder(run_lease_uri(run)).released is not None

    # a pass output: analyze into OUT while another analyze holds it
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (32 + i, 32), (20 * i, 90, 30)).save(images / f"{i}.png")
    table = pa.table({"id": [f"p{i}" for i in range(4)], "image": [str(images / f"{i}.png") for i in range(4)]})
    pq.write_table(table, tmp_path / "photos.parquet")
    out = str(tmp_path / "captions.parquet")
    argv = ["analyze", str(tmp_path / "photos.parquet"), "--task", "caption", "--out", out, "--no-progress",
            "--set", "vlm_batch_size=1", "--set", "vlm_rows_per_file=1"]  # fmt: skip
    first, codes = _in_background(argv, output_lease_uri(out))
    _refused(argv, capsys, f"dreamfleet analyze {tmp_path / 'photos.parquet'} --out {out}")
    first.join()
    assert codes == [0]
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(table.column("id").to_pylist())
