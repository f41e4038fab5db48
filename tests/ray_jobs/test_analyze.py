"""`dreamfleet analyze` end to end: Ray Data over real Parquet and images, on the tiny Qwen3-VL."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine import storage
from ray_jobs.cli import main

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"vendor": {"type": "string", "maxLength": 12}, "total": {"type": "number"}},
    "required": ["vendor", "total"],
}
MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.string()), ("image_bytes", pa.binary()),
                             ("batch", pa.string())])  # fmt: skip


def _png(colour: str, size=(80, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(folder: Path) -> tuple[list[dict], dict[str, str]]:
    """Good rows of every kind and one bad row per failure mode, each with the error it must get."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in {"doc.png": _png("white", (160, 90)), "photo.jpg": None, "empty.png": b"",
                       "text.png": b"not an image", "cut.png": _png("red")[:50]}.items():  # fmt: skip
        path = folder / name
        if data is None:
            Image.new("RGB", (50, 70), "green").save(path, format="JPEG")
        else:
            path.write_bytes(data)
    Image.new("RGB", (30, 30), "blue").save(folder / "scan.webp")
    Image.new("RGB", (30, 40), "grey").save(folder / "scan.tiff")
    Image.new("L", (4000, 4000)).save(folder / "bomb.png")
    good = [
        {"id": "png", "image": str(folder / "doc.png")},
        {"id": "jpeg", "image": str(folder / "photo.jpg")},
        {"id": "webp", "image": str(folder / "scan.webp")},
        {"id": "tiff", "image": f"file://{folder / 'scan.tiff'}"},
        {"id": "bytes", "image_bytes": _png("yellow")},
    ]
    bad = {
        "missing": ({"image": str(folder / "absent.png")}, "no such file"),
        "empty": ({"image": str(folder / "empty.png")}, "empty file"),
        "not-image": ({"image": str(folder / "text.png")}, "not an image in any format"),
        "truncated": ({"image": str(folder / "cut.png")}, "truncated"),
        "bomb": ({"image": str(folder / "bomb.png")}, "over the limit"),
        "neither": ({}, "neither 'image' nor 'image_bytes'"),
        "both": ({"image": str(folder / "doc.png"), "image_bytes": _png("red")}, "both"),
    }
    rows = good + [{"id": k, **v[0]} for k, v in bad.items()]
    for row in rows:
        row.setdefault("image", None)
        row.setdefault("image_bytes", None)
        row["batch"] = "b1"
    return rows, {k: v[1] for k, v in bad.items()}


def _write(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), path)
    return str(path)


@pytest.mark.parametrize("task, columns", [
    ("ocr", {"text": pa.string()}),
    ("caption", {"caption": pa.string()}),
    ("moderate", {"safe": pa.bool_(), "categories": pa.list_(pa.string()), "score": pa.float64()}),
    ("extract", {"fields": pa.string(), "vendor": pa.string(), "total": pa.float64()}),
])  # fmt: skip
def test_every_task_keeps_every_row_and_names_each_bad_one(ray_cluster, tmp_path, task, columns):
    rows, expected_errors = _rows(tmp_path / "images")
    manifest = _write(tmp_path / "images.parquet", rows)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    out = tmp_path / f"{task}.parquet"
    extra = ["--schema", str(schema_file)] if task == "extract" else []
    code = main(["analyze", manifest, "--task", task, "--out", str(out), "--set", "max_image_pixels=4000000", *extra])

    assert code == 1  # finished, with bad rows
    table = pq.read_table(out)
    expected = {"id": pa.string(), "image": pa.string(), "image_bytes": pa.binary(), "batch": pa.string(),
                "error": pa.string(), "model": pa.string(), "num_output_tokens": pa.int32(),
                "reasoning": pa.string(), **columns}  # fmt: skip
    assert {f.name: f.type for f in table.schema} == expected
    out_rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(out_rows) == sorted(r["id"] for r in rows)  # rows out == rows in
    for rid, fragment in expected_errors.items():
        assert fragment in out_rows[rid]["error"], (rid, out_rows[rid]["error"])
    for rid in ("png", "jpeg", "webp", "tiff", "bytes"):
        row = out_rows[rid]
        assert row["error"] is None and row["model"] == "tiny" and row["num_output_tokens"] > 0 and row["batch"] == "b1"
        if task == "extract":
            jsonschema.validate(json.loads(row["fields"]), SCHEMA)
            assert json.loads(row["fields"])["vendor"] == row["vendor"]
        if task == "moderate":
            assert 0 <= row["score"] <= 1 and set(row["categories"]) <= {f"S{i}" for i in range(1, 14)}


def test_a_rerun_appends_only_new_ids_and_finishes_an_interrupted_pass(ray_cluster, tmp_path):
    rows, _ = _rows(tmp_path / "images")
    good = [r for r in rows if r["id"] in ("png", "jpeg", "bytes")]
    out = tmp_path / "ocr.parquet"
    assert main(["analyze", _write(tmp_path / "a.parquet", good[:2]), "--task", "ocr", "--out", str(out)]) == 0
    first = {r["id"]: r for r in pq.read_table(out).to_pylist()}

    # A pass interrupted after committing one part: its rows are kept, not redone.
    part = pa.Table.from_pylist([{**good[2], "error": None, "model": "tiny", "num_output_tokens": 3,
                                  "reasoning": None, "text": "from an earlier part"}])  # fmt: skip
    storage.write_bytes(f"{out}.parts/part-x.parquet", _parquet(part))
    more = good + [{**good[0], "id": "new", "batch": "b2"}]
    assert main(["analyze", _write(tmp_path / "b.parquet", more), "--task", "ocr", "--out", str(out)]) == 0

    table = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(table) == ["bytes", "jpeg", "new", "png"]  # no duplicates
    assert table["png"] == first["png"] and table["bytes"]["text"] == "from an earlier part"
    assert not Path(f"{out}.parts").exists()


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("rows, message", [
    ([{"image": "x.png"}], "no 'id' column"),
    ([{"id": "a", "image": "x.png"}, {"id": "a", "image": "y.png"}], "duplicate ids"),
    ([{"id": "a", "path": "x.png"}], "needs an 'image' (URI) or 'image_bytes' column"),
])  # fmt: skip
def test_manifest_problems_stop_before_anything_runs(tmp_path, capsys, rows, message):
    manifest = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    assert main(["analyze", str(manifest), "--task", "ocr", "--out", str(tmp_path / "o.parquet")]) == 2
    assert message in capsys.readouterr().err


def test_s3_in_and_out(ray_cluster, tmp_path):
    import s3fs

    s3fs.S3FileSystem().mkdir("dreamfleet-analyze")
    storage.write_bytes("s3://dreamfleet-analyze/docs/a.png", _png("white"))
    rows = [{"id": "a", "image": "s3://dreamfleet-analyze/docs/a.png", "image_bytes": None, "batch": "s3"}]
    storage.write_bytes("s3://dreamfleet-analyze/images.parquet", _parquet(pa.Table.from_pylist(rows, MANIFEST_SCHEMA)))
    out = "s3://dreamfleet-analyze/out/caption.parquet"
    assert main(["analyze", "s3://dreamfleet-analyze/images.parquet", "--task", "caption", "--out", out]) == 0
    table = pq.read_table(io.BytesIO(storage.read_bytes(out)))
    assert table.column("id").to_pylist() == ["a"] and table.column("error").to_pylist() == [None]


def test_validate_images_prints_each_bad_row_and_its_reason(tmp_path, capsys):
    rows, expected_errors = _rows(tmp_path / "images")
    manifest = _write(tmp_path / "images.parquet", rows)
    assert main(["validate", manifest, "--kind", "images", "--set", "max_image_pixels=4000000"]) == 2
    out = capsys.readouterr().out
    for rid, fragment in expected_errors.items():
        line = next(line for line in out.splitlines() if f"(id {rid!r})" in line)
        assert fragment in line
    assert f"{len(expected_errors)} invalid row(s)" in out
    good = _write(tmp_path / "good.parquet", [r for r in rows if r["id"] not in expected_errors])
    assert main(["validate", good, "--kind", "images"]) == 0
