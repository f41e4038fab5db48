"""A pass output holding rows twice, parts nobody committed, or a pending part: repaired to one committed row per
(id, page), on a local disk and on S3 (moto's server), with a line saying what was removed."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import storage
from ray_jobs.passes.repair import repair_output


@pytest.fixture(params=["local", "s3"])
def out_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out.parquet")
    request.getfixturevalue("s3_endpoint")
    bucket = f"repair-{uuid.uuid4().hex[:12]}"
    storage.filesystem(f"s3://{bucket}")[0].mkdir(bucket)
    return f"s3://{bucket}/out.parquet"


def _part(out: str, name: str, rows: list[tuple], checkpoint: str | None) -> None:
    """Part `name` of OUT as Ray Data writes it: its data file, and its checkpoint ('committed', 'pending', None)."""
    table = pa.table({"id": [r[0] for r in rows], "page": pa.array([r[1] for r in rows], pa.int32()),
                      "error": pa.nulls(len(rows), pa.string())})  # fmt: skip
    storage.write_parquet(f"{out}/{name}-0.parquet", table)
    if checkpoint is not None:
        suffix = ".pending.parquet" if checkpoint == "pending" else ".parquet"
        storage.write_parquet(f"{out}.checkpoint/{name}{suffix}", table.select(["id"]))


def _rows(out: str) -> list[tuple]:
    fs, path = storage.filesystem(out)
    table = pq.read_table(path, filesystem=fs) if fs.exists(path) else None
    return sorted(zip(table.column("id").to_pylist(), table.column("page").to_pylist()), key=str)


def test_second_copies_and_uncommitted_parts_are_removed(out_uri):
    _part(out_uri, "w_000000", [("r0", None), ("r1", None), ("r2", None)], "committed")
    _part(out_uri, "w_000001", [("r2", None), ("r3", None)], "committed")  # r2 twice: two drivers, before leases
    _part(out_uri, "w_000002", [("doc", 1), ("doc", 2)], "committed")
    _part(out_uri, "w_000003", [("doc", 2), ("doc", 3)], "committed")  # page 2 twice, page 3 once
    _part(out_uri, "z_000000", [("r2", None)], "committed")  # wholly a second copy: its part goes
    _part(out_uri, "x_000000", [("r4", None)], "pending")  # a write in flight, or killed before its commit
    _part(out_uri, "y_000000", [("r1", None), ("r5", None)], None)  # a withdrawn or killed orphan's data file

    fs, path = storage.filesystem(out_uri)
    before = repair_output(fs, path, path + ".checkpoint", finished=False)
    assert before.duplicate_rows == 3 and before.debris_rows == 2 and len(before.debris_files) == 1
    lines = before.describe("OUT")
    assert "OUT held 3 row(s) twice (ids 'doc', 'r2')" in lines[0]
    assert "removed 1 part file(s) (2 rows) that no checkpoint commits" in lines[1]
    expected = [("doc", 1), ("doc", 2), ("doc", 3), ("r0", None), ("r1", None), ("r2", None), ("r3", None)]
    assert _rows(out_uri) == sorted([*expected, ("r4", None)], key=str)  # the pending part is Ray Data's to clean

    after = repair_output(fs, path, path + ".checkpoint", finished=True)
    assert after.debris_rows == 1 and after.duplicate_rows == 0 and _rows(out_uri) == expected
    checkpoints = pq.read_table(path + ".checkpoint", filesystem=fs).column("id").to_pylist()
    assert sorted(checkpoints) == sorted(row[0] for row in expected)  # the checkpoint lists exactly what OUT holds
    assert repair_output(fs, path, path + ".checkpoint", finished=True).describe("OUT") == []
