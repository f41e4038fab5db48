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
        "neither": ({}, "none of 'image', 'image_bytes', 'video'"),
        "both": ({"image": str(folder / "doc.png"), "image_bytes": _png("red")}, "give exactly one"),
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


def _write_folder(folder: Path, rows: list[dict], files: int) -> str:
    """The rows spread over `files` Parquet files in `folder`, as datasets of many files come."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        _write(folder / f"part-{k:03}.parquet", rows[k::files])
    return str(folder)


@pytest.mark.parametrize("task, columns", [
    ("ocr", {"text": pa.string()}),
    ("caption", {"caption": pa.string()}),
    ("moderate", {"safe": pa.bool_(), "categories": pa.list_(pa.string()), "score": pa.float64()}),
    ("extract", {"fields": pa.string(), "vendor": pa.string(), "total": pa.float64()}),
])  # fmt: skip
def test_every_task_keeps_every_row_and_names_each_bad_one(ray_cluster, tmp_path, task, columns):
    rows, expected_errors = _rows(tmp_path / "images")
    manifest = _write_folder(tmp_path / "manifest", rows, files=3)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    out = tmp_path / f"{task}.parquet"
    extra = ["--schema", str(schema_file)] if task == "extract" else []
    code = main(["analyze", manifest, "--task", task, "--out", str(out), "--set", "max_image_pixels=4000000",
                 "--set", "vlm_rows_per_file=5", *extra])  # fmt: skip

    assert code == 1  # finished, with bad rows
    assert out.is_dir() and all(pq.read_metadata(f).num_rows <= 5 for f in out.glob("*.parquet"))
    table = pq.read_table(out)
    expected = {"id": pa.string(), "image": pa.string(), "image_bytes": pa.binary(), "batch": pa.string(),
                "error": pa.string(), "model": pa.string(), "num_output_tokens": pa.int32(),
                "reasoning": pa.string(), "page": pa.int32(), **columns}  # fmt: skip
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


def test_a_rerun_answers_only_new_ids_and_leaves_written_part_files_alone(ray_cluster, tmp_path):
    rows, _ = _rows(tmp_path / "images")
    good = [r for r in rows if r["id"] in ("png", "jpeg", "bytes", "webp")]
    docs, out = tmp_path / "docs", tmp_path / "ocr.parquet"
    _write_folder(docs, good[:2], files=2)
    assert main(["analyze", str(docs), "--task", "ocr", "--out", str(out)]) == 0
    first = {f.name: f.read_bytes() for f in out.glob("*.parquet")}

    _write(docs / "part-002.parquet", good[2:])  # the dataset grows by a file
    assert main(["analyze", str(docs), "--task", "ocr", "--out", str(out)]) == 0
    assert all((out / name).read_bytes() == data for name, data in first.items())  # nothing rewritten
    new_files = [f for f in out.glob("*.parquet") if f.name not in first]
    assert sorted(pq.read_table(new_files[0]).column("id").to_pylist()) == sorted(r["id"] for r in good[2:])
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in good)  # every id once

    # Nothing left: the same command writes nothing.
    written = sorted(f.name for f in out.glob("*.parquet"))
    assert main(["analyze", str(docs), "--task", "ocr", "--out", str(out)]) == 0
    assert sorted(f.name for f in out.glob("*.parquet")) == written


def test_a_write_killed_before_its_commit_is_redone_once_not_twice(ray_cluster, tmp_path):
    """The one window Ray Data's two-phase commit guards: a write task killed after writing its part file and before
    renaming its pending checkpoint to committed. That is exactly what it leaves behind; recreate it and rerun."""
    rows, _ = _rows(tmp_path / "images")
    good = [r for r in rows if r["id"] in ("png", "jpeg", "bytes", "webp", "tiff")]
    docs, out = _write_folder(tmp_path / "docs", good, files=5), tmp_path / "ocr.parquet"
    args = ["analyze", docs, "--task", "ocr", "--out", str(out), "--set", "vlm_batch_size=1", "--set", "vlm_rows_per_file=1"]
    assert main(args) == 0
    checkpoint = Path(f"{out}.checkpoint")
    committed = sorted(checkpoint.glob("*.parquet"))
    victim = committed[0]
    victim_ids = pq.read_table(victim).column("id").to_pylist()
    victim.rename(victim.with_name(victim.name.removesuffix(".parquet") + ".pending.parquet"))
    orphans = [f for f in out.glob("*.parquet") if f.name.startswith(victim.name.removesuffix(".parquet"))]
    assert orphans  # the killed task's part file(s), written but never committed

    assert main(args) == 0
    assert not any(f.exists() for f in orphans) and not list(checkpoint.glob("*.pending.parquet"))
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in good)  # the orphan's rows once, from the rerun
    assert set(victim_ids) <= set(ids)


@pytest.mark.parametrize("rows, message", [
    ([{"image": "x.png"}], "no 'id' column"),
    ([{"id": "a", "image": "x.png"}, {"id": "a", "image": "y.png"}], "duplicate ids"),
    ([{"id": "a", "path": "x.png"}], "needs an 'image' (URI), 'image_bytes' or 'video' (URI) column"),
])  # fmt: skip
def test_manifest_problems_stop_before_anything_runs(tmp_path, capsys, rows, message):
    manifest = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    assert main(["analyze", str(manifest), "--task", "ocr", "--out", str(tmp_path / "o.parquet")]) == 2
    assert message in capsys.readouterr().err


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_s3_folder_in_and_dataset_out(ray_cluster, tmp_path):
    import pyarrow.dataset as pds
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("dreamfleet-analyze")
    rows = []
    for k in range(3):
        storage.write_bytes(f"s3://dreamfleet-analyze/images/{k}.png", _png("white"))
        rows.append({"id": f"d{k}", "image": f"s3://dreamfleet-analyze/images/{k}.png", "image_bytes": None,
                     "batch": "s3"})  # fmt: skip
        part = pa.Table.from_pylist(rows[-1:], MANIFEST_SCHEMA)
        storage.write_bytes(f"s3://dreamfleet-analyze/docs/part-{k}.parquet", _parquet(part))
    out = "s3://dreamfleet-analyze/out/caption.parquet"
    assert main(["analyze", "s3://dreamfleet-analyze/docs/", "--task", "caption", "--out", out]) == 0
    table = pds.dataset("dreamfleet-analyze/out/caption.parquet", filesystem=fs, format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == ["d0", "d1", "d2"] and table.column("error").null_count == 3
    assert fs.ls("dreamfleet-analyze/out/caption.parquet.checkpoint")  # Ray Data's record, beside the output


def test_hive_partitions_pass_through_and_every_reader_reads_the_output(ray_cluster, tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    rows, _ = _rows(tmp_path / "images")
    good = [r for r in rows if r["id"] in ("png", "jpeg", "bytes", "webp", "tiff")]
    for row, (year, region) in zip(good, [(2025, "eu"), (2025, "eu"), (2025, "us"), (2026, "eu"), (2026, "us")]):
        folder = tmp_path / "docs" / f"year={year}" / f"region={region}"
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / f"{row['id']}.parquet", [row])
    out = tmp_path / "captions.parquet"
    assert main(["analyze", str(tmp_path / "docs"), "--task", "caption", "--out", str(out),
                 "--set", "vlm_rows_per_file=2"]) == 0  # fmt: skip

    expected = {r["id"]: r for r in good}
    table = pq.read_table(out)
    for row in table.to_pylist():
        source = next(p for p in (tmp_path / "docs").rglob(f"{row['id']}.parquet"))
        assert f"year={row['year']}" in str(source) and f"region={row['region']}" in str(source)
        assert row["batch"] == expected[row["id"]]["batch"]
    assert len(list(out.glob("*.parquet"))) >= 3  # at most 2 rows a file
    readers = {
        "pandas": lambda: pd.read_parquet(out)["id"].tolist(),
        "polars": lambda: pl.read_parquet(f"{out}/*.parquet")["id"].to_list(),
        "duckdb": lambda: [r[0] for r in duckdb.sql(f"select id from read_parquet('{out}/*.parquet')").fetchall()],
        "ray": lambda: [r["id"] for r in ray_cluster.data.read_parquet(str(out)).take_all()],
    }
    for name, read in readers.items():
        assert sorted(read()) == sorted(expected), name


def test_outputs_a_pass_cannot_write_are_refused_before_it_runs(tmp_path, capsys):
    rows, _ = _rows(tmp_path / "images")
    manifest = _write(tmp_path / "images.parquet", [r for r in rows if r["id"] == "png"])
    legacy = tmp_path / "old.parquet"
    legacy.write_bytes(_parquet(pa.table({"id": ["x"]})))
    for out, message in [(str(legacy), "a single Parquet file"), ("memory://out", "private to one process")]:
        assert main(["analyze", manifest, "--task", "ocr", "--out", out]) == 2
        assert message in capsys.readouterr().err


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


SHRUNKEN_CLUSTER = """
import json, sys, time
import ray
from ray.cluster_utils import Cluster
from ray_jobs.cli import main

manifest, out = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
lost = cluster.add_node(num_cpus=1, num_gpus=1)
cluster.wait_for_nodes()
cluster.remove_node(lost)  # the node that died during training
results = []
for extra in (["--set", "vlm_cpus_per_actor=1"], []):
    began = time.time()
    code = main(["analyze", manifest, "--task", "ocr", "--out", f"{out}-{len(results)}", "--no-progress",
                 "--address", cluster.address, *extra])
    results.append({"code": code, "seconds": time.time() - began})
print(json.dumps(results))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow  # a cluster of its own, in a subprocess
def test_a_cluster_left_with_one_cpu_runs_the_pass_or_says_why_not_at_once(tmp_path):
    """The shape that hung for 5 minutes in silence: two nodes of 1 CPU + 1 GPU, one of them lost. A model actor
    holding the last CPU would leave none for decoding; asked for explicitly, the pass refuses at once, naming the
    shortfall; left to choose, the actor shares the CPU and the pass finishes."""
    import subprocess
    import sys

    rows, _ = _rows(tmp_path / "images")
    manifest = _write(tmp_path / "images.parquet", [r for r in rows if r["id"] in ("png", "jpeg")])
    script = tmp_path / "shrunken.py"
    script.write_text(SHRUNKEN_CLUSTER)
    done = subprocess.run([sys.executable, str(script), manifest, str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    explicit, chosen = json.loads(done.stdout.strip().splitlines()[-1])
    assert explicit["code"] == 2 and explicit["seconds"] < 60
    assert "the VLM pass cannot run on this cluster" in done.stderr
    assert "Alive: 1 node(s), 1 CPU, 1 GPU; needed: 2 CPU" in done.stderr
    assert chosen["code"] == 0 and "share their nodes' CPUs" in done.stderr
    assert sorted(pq.read_table(tmp_path / "out-1").column("id").to_pylist()) == ["jpeg", "png"]


def test_extraction_with_eight_unbounded_strings_closes_its_json_on_every_document(ray_cluster, tmp_path):
    """The tiny default (128 new tokens) on phone-sized receipt photos with a wide schema of plain strings: every
    readable document gets schema-valid fields (the decoding bounds are derived from the token budget)."""
    import numpy as np
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    rows = []
    for k in range(3):
        photo = Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8))  # sensor noise, 1600x1200
        pen = ImageDraw.Draw(photo)
        for i, line in enumerate(["ACME COFFEE", "2026-01-14", f"TOTAL {12.5 + k:.2f} EUR"]):
            pen.text((100, 100 + 80 * i), line, fill="white")
        path = tmp_path / f"receipt-{k}.jpg"
        photo.save(path, format="JPEG", quality=92, exif=Image.Exif())
        assert path.stat().st_size > 1_000_000  # as phones write them
        rows.append({"id": f"receipt-{k}", "image": str(path), "image_bytes": None, "batch": "wide"})
    names = ["vendor", "date", "address", "phone", "invoice_number", "currency", "cashier", "payment"]
    schema = {"type": "object", "properties": {n: {"type": "string"} for n in names}, "required": names}
    schema_file = tmp_path / "wide.schema.json"
    schema_file.write_text(json.dumps(schema))
    out = tmp_path / "fields.parquet"
    assert main(["analyze", _write(tmp_path / "receipts.parquet", rows), "--task", "extract", "--schema",
                 str(schema_file), "--out", str(out)]) == 0  # fmt: skip
    for row in pq.read_table(out).to_pylist():
        assert row["error"] is None, row["error"]
        jsonschema.validate(json.loads(row["fields"]), schema)


@pytest.mark.slow  # a cluster of its own, in a subprocess
def test_a_new_driver_prints_dreamfleets_own_lines_and_none_of_rays(tmp_path):
    """A newcomer's console: progress and the summary; Ray's notices only with --verbose (and in Ray's logs)."""
    import subprocess
    import sys

    rows, _ = _rows(tmp_path / "images")
    manifest = _write(tmp_path / "images.parquet", [r for r in rows if r["id"] in ("png", "jpeg")])
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "ray_jobs", "analyze", manifest, "--task", "ocr", "--out",
                           str(tmp_path / "ocr.parquet")], capture_output=True, text=True, timeout=600, cwd=repo)  # fmt: skip
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert '"rows": 2' in console
    for noise in ("INFO", "WARNING", "core_worker.cc", "Token authentication", "Deprecat", "FutureWarning"):
        assert noise not in console, (noise, console[-3000:])
