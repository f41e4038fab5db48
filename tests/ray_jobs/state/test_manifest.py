"""Tests for ray_jobs/manifest.py: real Parquet files and real PNGs, one case per rule of the subjects manifest."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.diffusion.subject import Subject
from engine.settings import Settings, load_settings
from ray_jobs.state.manifest import (
    ManifestError,
    RowError,
    read_subjects_manifest,
    write_subjects_manifest,
)

LONG = "x" * 10_001


def png_bytes(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings("tiny")


@pytest.fixture
def images(tmp_path: Path) -> dict[str, str]:
    """A good PNG, a second good PNG, a file that is not an image, and a path that does not exist."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "b.png").write_bytes(png_bytes((10, 200, 10)))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return {name: str(tmp_path / f"{name}.png") for name in ("a", "b", "broken", "missing")}


def good_row(images: dict[str, str], subject_id: str = "dog-0", **changes: Any) -> dict[str, Any]:
    row = {
        "subject_id": subject_id,
        "instance_images": [images["a"], images["b"]],
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of a dog",
        "prompts": ["sks dog on a beach"],
        "num_images_per_prompt": 2,
        "seed": 7,
        "params": None,
    }
    return {**row, **changes}


def read_rows(tmp_path: Path, rows: list[dict], settings: Settings, **kwargs: Any):
    uri = str(tmp_path / "subjects.parquet")
    write_subjects_manifest(uri, rows)
    return read_subjects_manifest(uri, settings, **kwargs)


# Each case: changes to a good row, then what its error must say.
BAD_ROWS = [
    ({"subject_id": None}, "subject_id is missing"),
    ({"subject_id": ""}, "subject_id is empty"),
    ({"subject_id": "_dog"}, "letters, digits, '.', '_' and '-', up to 128 characters, not starting with"),
    ({"subject_id": "a/b"}, "letters, digits"),
    ({"subject_id": "dog\n"}, "letters, digits"),
    ({"subject_id": "d" * 129}, "up to 128 characters"),
    ({"subject_id": "ok-0"}, "duplicate subject_id, first seen at row 0"),
    ({"instance_images": None}, "instance_images is missing"),
    ({"instance_images": []}, "instance_images is empty: give 1 to 64 image URIs"),
    ({"instance_images": ["{a}"] * 65}, "instance_images has 65 images, more than 64"),
    ({"instance_images": ["{a}", ""]}, "instance_images[1] is empty"),
    ({"instance_images": ["{a}", None]}, "instance_images[1] is empty"),
    ({"instance_images": ["nosuchfs://bucket/x.png"]}, "unknown protocol 'nosuchfs'"),
    ({"instance_images": ["{missing}"]}, "/missing.png': no such file"),
    ({"instance_images": ["{broken}"]}, "/broken.png' is not a readable image: not an image in any format"),
    ({"instance_prompt": None}, "instance_prompt is missing"),
    ({"instance_prompt": "  "}, "instance_prompt is empty"),
    ({"instance_prompt": LONG}, "instance_prompt is 10001 characters long, more than 10000"),
    ({"class_prompt": None}, "class_prompt is required when with_prior_preservation is on"),
    ({"class_prompt": ""}, "class_prompt is required when with_prior_preservation is on"),
    ({"class_prompt": LONG}, "class_prompt is 10001 characters long"),
    ({"prompts": ["ok", ""]}, "prompts[1] is empty"),
    ({"prompts": ["ok", None]}, "prompts[1] is missing"),
    ({"prompts": [LONG]}, "prompts[0] is 10001 characters long"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt: Input should be greater than or equal to 1"),
    ({"seed": -1}, "seed must be between 0 and 2**63 - 1, got -1"),
    ({"params": "{not json"}, "params: not valid JSON"),
    ({"params": "[1, 2]"}, "params: must be a JSON object, got list"),
    ({"params": '{"nosuch": 1}'}, "params: unknown setting(s) 'nosuch'"),
    ({"params": '{"max_attempts": 5}'}, "params: 'max_attempts' can only be set for the whole run"),
    ({"params": '{"lora_rank": 0}'}, "params: lora_rank: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize(("changes", "expected"), BAD_ROWS, ids=[e for _, e in BAD_ROWS])
def test_bad_row_is_reported_with_row_and_reason(tmp_path, images, settings, changes, expected):
    if "instance_images" in changes and changes["instance_images"]:
        changes = {"instance_images": [u.format(**images) if u else u for u in changes["instance_images"]]}
    rows = [good_row(images, "ok-0"), {**good_row(images, "bad-1"), **changes}, good_row(images, "ok-2")]

    manifest = read_rows(tmp_path, rows, settings)

    assert [s.subject_id for s in manifest.subjects] == ["ok-0", "ok-2"]
    [error] = manifest.errors
    assert error.row == 1
    assert expected in error.reason
    subject_id = changes.get("subject_id", "bad-1")
    assert str(error).startswith(f"row 1 (subject {subject_id!r}): " if subject_id else "row 1: ")


def test_row_error_str_names_row_and_subject():
    error = RowError(3, "dog-1", "duplicate subject_id, first seen at row 0")
    assert str(error) == "row 3 (subject 'dog-1'): duplicate subject_id, first seen at row 0"
    assert str(RowError(4, None, "subject_id is missing")) == "row 4: subject_id is missing"


def test_every_problem_in_a_row_is_reported_in_column_order(tmp_path, images, settings):
    row = good_row(images, instance_images=[images["missing"]], instance_prompt="", params="{")

    [error] = read_rows(tmp_path, [row], settings).errors

    assert error.reason.split("; ") == [
        f"image {images['missing']!r}: no such file",
        "instance_prompt is empty",
        "params: not valid JSON (Expecting property name enclosed in double quotes at char 1)",
    ]


def test_errors_come_in_row_order(tmp_path, images, settings):
    rows = [good_row(images, f"s-{i}", instance_images=[images["missing" if i % 2 else "a"]]) for i in range(20)]

    manifest = read_rows(tmp_path, rows, settings)

    assert [e.row for e in manifest.errors] == list(range(1, 20, 2))
    assert [s.subject_id for s in manifest.subjects] == [f"s-{i}" for i in range(0, 20, 2)]


def test_good_rows_become_subjects(tmp_path, images, settings):
    rows = [
        good_row(images, "dog-0", params=json.dumps({"max_train_steps": 5, "learning_rate": 1e-3})),
        good_row(images, "cat-1", class_prompt=None, prompts=None, num_images_per_prompt=None, seed=None,
                 params='{"with_prior_preservation": false}'),
        good_row(images, "bad-2", instance_prompt=None),
    ]

    manifest = read_rows(tmp_path, rows, settings)

    assert manifest.subjects == [
        Subject("dog-0", (images["a"], images["b"]), "a photo of sks dog", "a photo of a dog",
                ("sks dog on a beach",), 2, 7, {"max_train_steps": 5, "learning_rate": 1e-3}),
        Subject("cat-1", (images["a"], images["b"]), "a photo of sks dog",
                params={"with_prior_preservation": False}),
    ]
    assert [str(e) for e in manifest.errors] == ["row 2 (subject 'bad-2'): instance_prompt is missing"]


def test_class_prompt_follows_the_effective_prior_preservation(tmp_path, images, settings):
    off = settings.with_overrides({"with_prior_preservation": False})
    rows = [
        good_row(images, "off-0", class_prompt=None),
        good_row(images, "on-1", class_prompt=None, params='{"with_prior_preservation": true}'),
    ]

    manifest = read_rows(tmp_path, rows, off)

    assert [s.subject_id for s in manifest.subjects] == ["off-0"]
    assert [str(e) for e in manifest.errors] == [
        "row 1 (subject 'on-1'): class_prompt is required when with_prior_preservation is on"
    ]


def test_check_images_false_skips_opening_images(tmp_path, images, settings):
    rows = [good_row(images, instance_images=[images["missing"], images["broken"], "nosuchfs://x.png"])]

    [error] = read_rows(tmp_path, rows, settings, check_images=False).errors

    # The URI's protocol is still checked: it needs no I/O.
    assert error.reason == "image 'nosuchfs://x.png' has an unknown protocol 'nosuchfs'"


def test_protocol_whose_package_is_missing_is_reported(tmp_path, images, settings):
    # As gs:// is where gcsfs is not installed: fsspec knows the protocol but cannot import its filesystem.
    fsspec.register_implementation("nopkgfs", "dreamfleet_no_such_package.FileSystem", clobber=True)
    rows = [good_row(images, instance_images=["nopkgfs://bucket/a.png"])]

    [error] = read_rows(tmp_path, rows, settings).errors

    assert error.reason.startswith("image 'nopkgfs://bucket/a.png' needs a package that is not installed")


def test_other_columns_pass_through(tmp_path, images, settings):
    rows = [good_row(images, "dog-0", owner="alice", priority=3), good_row(images, "dog-1", owner=None, priority=1)]

    manifest = read_rows(tmp_path, rows, settings)

    assert manifest.passthrough == {"dog-0": {"owner": "alice", "priority": 3}, "dog-1": {"owner": None, "priority": 1}}


def test_fingerprint_is_sha256_of_the_file(tmp_path, images, settings):
    manifest = read_rows(tmp_path, [good_row(images)], settings)

    assert manifest.fingerprint == hashlib.sha256((tmp_path / "subjects.parquet").read_bytes()).hexdigest()


def test_memory_uris_for_manifest_and_images(settings):
    base = f"memory://manifest-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{base}/a.png", png_bytes())
    try:
        rows = [
            {"subject_id": "m-0", "instance_images": [f"{base}/a.png"], "instance_prompt": "a photo of sks dog",
             "class_prompt": "a photo of a dog"},
            {"subject_id": "m-1", "instance_images": [f"{base}/gone.png"], "instance_prompt": "a photo of sks dog",
             "class_prompt": "a photo of a dog"},
        ]
        write_subjects_manifest(f"{base}/subjects.parquet", rows)

        manifest = read_subjects_manifest(f"{base}/subjects.parquet", settings)

        assert manifest.uri == f"{base}/subjects.parquet"
        assert [s.instance_images for s in manifest.subjects] == [(f"{base}/a.png",)]
        assert [str(e) for e in manifest.errors] == [f"row 1 (subject 'm-1'): image '{base}/gone.png': no such file"]
    finally:
        fs.rm(base.removeprefix("memory://"), recursive=True)


def test_write_uses_the_spec_arrow_types(tmp_path, images):
    uri = str(tmp_path / "subjects.parquet")
    write_subjects_manifest(uri, [good_row(images, params='{"lora_rank": 4}')])

    schema = pq.read_schema(uri)

    assert schema.field("subject_id").type == pa.string()
    assert schema.field("instance_images").type == pa.list_(pa.string())
    assert schema.field("prompts").type == pa.list_(pa.string())
    assert schema.field("num_images_per_prompt").type == pa.int32()
    assert schema.field("seed").type == pa.int64()
    assert schema.field("params").type == pa.string()


def test_large_and_other_integer_variants_are_accepted(tmp_path, images, settings):
    table = pa.table({
        "subject_id": pa.array(["dog-0"], pa.large_string()),
        "instance_images": pa.array([[images["a"]]], pa.large_list(pa.large_string())),
        "instance_prompt": pa.array(["a photo of sks dog"], pa.large_string()),
        "class_prompt": pa.array([None], pa.null()),
        "num_images_per_prompt": pa.array([3], pa.int8()),
        "seed": pa.array([2**63 - 1], pa.uint64()),
    })
    pq.write_table(table, tmp_path / "subjects.parquet")

    manifest = read_subjects_manifest(str(tmp_path / "subjects.parquet"), settings.with_overrides(
        {"with_prior_preservation": False}))

    assert manifest.errors == []
    assert manifest.subjects == [Subject("dog-0", (images["a"],), "a photo of sks dog", None, (), 3, 2**63 - 1)]


# --- the file as a whole ---


def write_table(tmp_path: Path, columns: dict[str, pa.Array]) -> str:
    path = tmp_path / "subjects.parquet"
    pq.write_table(pa.table(columns), path)
    return str(path)


def required_columns(**changes: pa.Array) -> dict[str, pa.Array]:
    columns = {
        "subject_id": pa.array(["dog-0"]),
        "instance_images": pa.array([["a.png"]]),
        "instance_prompt": pa.array(["a photo of sks dog"]),
    }
    return {**columns, **changes}


def test_missing_file_is_a_manifest_error(tmp_path, settings):
    with pytest.raises(ManifestError, match="nope.parquet: no such file"):
        read_subjects_manifest(str(tmp_path / "nope.parquet"), settings)


def test_not_parquet_is_a_manifest_error(tmp_path, settings):
    (tmp_path / "subjects.parquet").write_text("subject_id,instance_images\ndog-0,a.png\n")

    with pytest.raises(ManifestError, match="subjects.parquet: not a Parquet file"):
        read_subjects_manifest(str(tmp_path / "subjects.parquet"), settings)


def test_zero_rows_is_a_manifest_error(tmp_path, settings):
    uri = write_table(tmp_path, {k: v.slice(0, 0) for k, v in required_columns().items()})

    with pytest.raises(ManifestError, match="subjects.parquet: no rows"):
        read_subjects_manifest(uri, settings)


def test_missing_required_columns_are_a_manifest_error(tmp_path, settings):
    uri = write_table(tmp_path, {"subject_id": pa.array(["dog-0"])})

    with pytest.raises(ManifestError) as caught:
        read_subjects_manifest(uri, settings)

    assert str(caught.value) == f"{uri}: missing required column(s) 'instance_images', 'instance_prompt'"


WRONG_TYPES = [
    ({"instance_images": pa.array(["a.png"])}, "column 'instance_images' must be list<string>, got string"),
    ({"instance_images": pa.array([[1]])}, "column 'instance_images' must be list<string>, got list<int64>"),
    ({"subject_id": pa.array([1])}, "column 'subject_id' must be string, got int64"),
    ({"instance_prompt": pa.array([None], pa.null())}, "column 'instance_prompt' must be string, got null"),
    ({"seed": pa.array(["7"])}, "column 'seed' must be int64, got string"),
    ({"num_images_per_prompt": pa.array([2.0])}, "column 'num_images_per_prompt' must be int32, got double"),
    ({"params": pa.array([1])}, "column 'params' must be string, got int64"),
]


@pytest.mark.parametrize(("changes", "expected"), WRONG_TYPES, ids=[e for _, e in WRONG_TYPES])
def test_wrong_column_type_is_a_manifest_error(tmp_path, settings, changes, expected):
    uri = write_table(tmp_path, required_columns(**changes))

    with pytest.raises(ManifestError) as caught:
        read_subjects_manifest(uri, settings)

    assert str(caught.value) == f"{uri}: {expected}"
