"""The input of a VLM pass: files, folders, globs and Hive partitions, on local disk and the S3 API server, and the
file-level checks over all of them (no Ray: these run in the driver before anything starts)."""

from __future__ import annotations

import io
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import storage
from engine.settings import load_settings
from ray_jobs.passes.inputs import check_image_rows, check_images_manifest
from ray_jobs.state.manifest import ManifestError


def _write(uri: str, rows: list[dict], schema: pa.Schema | None = None) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    storage.write_bytes(uri, sink.getvalue())


def _rows(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "image": f"/img/{prefix}{i}.png"} for i in range(n)]


def test_a_file_a_folder_a_glob_and_hive_partitions_give_every_file(tmp_path):
    root = tmp_path / "docs"
    _write(str(root / "year=2025" / "region=eu" / "part-0.parquet"), _rows("a", 3))
    _write(str(root / "year=2025" / "region=us" / "part-0.parquet"), _rows("b", 2))
    _write(str(root / "year=2026" / "region=eu" / "part-1.parquet"), _rows("c", 4))
    (root / "_SUCCESS").write_text("")  # what Spark leaves beside its output
    _write(str(root / "_temporary" / "x.parquet"), _rows("tmp", 1))

    folder = check_images_manifest(str(root))
    assert len(folder.files) == 3 and folder.num_rows == 9
    assert folder.partition_columns == ("year", "region")
    assert folder.schema.field("year").type == pa.string()  # as Ray Data's Hive partitioning reads it
    assert check_images_manifest(f"file://{root}/").num_rows == 9

    one = check_images_manifest(str(root / "year=2025" / "region=us" / "part-0.parquet"))
    assert one.num_rows == 2 and one.partition_columns == ()

    globbed = check_images_manifest(str(root / "year=2025" / "*" / "*.parquet"))
    assert globbed.num_rows == 5 and globbed.partition_columns == ("region",)
    regions = globbed.scanner(["id", "region"]).to_table()
    assert sorted(set(regions.column("region").to_pylist())) == ["eu", "us"]


def test_the_s3_api_server_serves_folders_and_globs(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem().mkdir("dreamfleet-input")
    for k in range(3):
        _write(f"s3://dreamfleet-input/docs/part-{k}.parquet", _rows(f"f{k}-", 5))
    assert check_images_manifest("s3://dreamfleet-input/docs").num_rows == 15
    assert check_images_manifest("s3://dreamfleet-input/docs/").num_rows == 15
    assert check_images_manifest("s3://dreamfleet-input/docs/part-[01].parquet").num_rows == 10


@pytest.mark.parametrize("layout, message", [
    ({"a.parquet": _rows("x", 2), "b.parquet": _rows("x", 1)}, "duplicate ids, e.g. ['x0']"),
    ({"a.parquet": _rows("x", 2), "b.parquet": [{"id": None, "image": "/i.png"}, {"id": "y", "image": "/i.png"}]},
     "1 row(s) have no id"),
    ({"a.parquet": _rows("x", 2), "b.parquet": [{"id": "y", "image": "/i.png", "extra": 1}]}, "its columns differ"),
    ({"a.parquet": [{"id": "y", "path": "/i.png"}]}, "needs an 'image' (URI), 'image_bytes' or 'video' (URI) column"),
    ({"a.parquet": [{"image": "/i.png"}]}, "no 'id' column"),
    ({"a.parquet": [{"id": 1, "image": "/i.png"}]}, "column 'id' has type int64"),
    ({"notes.txt": None}, "no Parquet files"),
])  # fmt: skip
def test_file_level_problems_are_found_across_all_files(tmp_path, layout, message):
    for name, rows in layout.items():
        if rows is None:
            (tmp_path / name).write_text("hello")
        else:
            _write(str(tmp_path / name), rows)
    with pytest.raises(ManifestError, match=re.escape(message)):
        check_images_manifest(str(tmp_path))


def test_text_that_is_not_utf8_and_files_that_are_not_parquet_are_named(tmp_path):
    _write(str(tmp_path / "a.parquet"), _rows("a", 2))
    (tmp_path / "b.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(ManifestError, match="b.parquet: not a readable Parquet file"):
        check_images_manifest(str(tmp_path))
    bad = tmp_path / "utf8"
    bad.mkdir()
    # Bytes written as a string column, as a careless writer can: Parquet does not check them.
    ids = pa.Array.from_buffers(pa.string(), 2, pa.array([b"ok", b"\xff\xfe"], pa.binary()).buffers()[:3])
    pq.write_table(pa.table({"id": ids, "image": ["/a.png", "/b.png"]}), bad / "x.parquet")
    with pytest.raises(ManifestError, match="column 'id' holds text that is not valid UTF-8"):
        check_images_manifest(str(bad))
    with pytest.raises(ManifestError, match="no such file or folder"):
        check_images_manifest(str(tmp_path / "absent"))


def test_many_unique_ids_over_many_files_pass_and_one_repeat_among_them_is_found(tmp_path):
    for k in range(20):
        _write(str(tmp_path / f"part-{k:02}.parquet"), [{"id": f"doc-{k}-{i}", "image": "/i.png"} for i in range(5000)])
    assert check_images_manifest(str(tmp_path)).num_rows == 100_000
    _write(str(tmp_path / "part-20.parquet"), [{"id": "doc-7-4321", "image": "/i.png"}])
    with pytest.raises(ManifestError, match=r"duplicate ids, e.g. \['doc-7-4321'\]"):
        check_images_manifest(str(tmp_path))


def test_validate_rows_count_across_files(tmp_path):
    _write(str(tmp_path / "a.parquet"), [{"id": "a", "image": str(tmp_path / "missing.png")}])
    _write(str(tmp_path / "b.parquet"), [{"id": "b", "image": str(tmp_path / "gone.png")}])
    problems = list(check_image_rows(str(tmp_path), load_settings("tiny")))
    assert [(row, rid) for row, rid, _ in problems] == [(0, "a"), (1, "b")]
    assert all("no such file" in reason for _, _, reason in problems)
