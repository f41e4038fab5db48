"""The catalogue of bad input: each case, the message a user gets, and that nothing else is lost.

Read the tables below as the list. Job-level cases (a manifest file, a schema, a config that cannot be used) stop
the command before anything runs: exit 2, the message on stderr, no RUN or OUTPUT written. Row-level cases fail
their row alone: `dreamfleet validate` prints the row with its reason (exit 2); `train` and `analyze` finish every
good row and record the bad row's reason (exit 1). Unusual but valid images (expect None) are accepted.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine import storage
from engine.diffusion.base_model import resolve_base_model
from engine.settings import Settings
from ray_jobs.cli import main
from ray_jobs.report.run_report import write_run_report
from ray_jobs.state.manifest import read_subjects_manifest, write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory
from samples import media_files
from tests.helpers.subjects import draw_subject, make_subject_rows

FAST = ["--set", "max_train_steps=4", "--set", "checkpointing_steps=2", "--set", "num_class_images=2", "--no-progress"]


# -- images: each is an instance image of its own subject (train) and a row of an images manifest (analyze) ------


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _photo(mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (48, 40), (30, 60, 200))
    image.paste((240, 200, 20), (10, 8, 36, 32))
    return image.convert(mode)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return _encoded(_photo(), "JPEG", exif=exif)


def _animated_gif() -> bytes:
    frames = [_photo(), Image.new("RGB", (48, 40), (200, 0, 0))]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


IMAGES: list[tuple[str, str, bytes, str | None]] = [
    # case, file name, bytes, expected message (None: accepted)
    ("zero-bytes", "empty.png", b"", "empty file (0 bytes)"),
    ("truncated-jpeg", "cut.jpg", _encoded(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")[:600],
     "the file is truncated"),
    ("text-named-png", "notes.png", b"dear diary, today I was a PNG", "not an image in any format Pillow reads"),
    ("cmyk-jpeg", "cmyk.jpg", _encoded(_photo("CMYK"), "JPEG"), None),
    ("16-bit-png", "deep.png", _encoded(_photo("L").convert("I;16"), "PNG"), None),
    ("palette-png", "palette.png", _encoded(_photo("P"), "PNG"), None),
    ("exif-rotated", "rotated.jpg", _exif_rotated(), None),
    ("1x1-px", "pixel.png", _encoded(Image.new("RGB", (1, 1)), "PNG"), "1x1 px, smaller than 16 px on a side"),
    ("decompression-bomb", "bomb.png", _encoded(Image.new("1", (9000, 9000)), "PNG"),
     "9000x9000 = 81000000 pixels, over the limit of 64000000"),
    ("animated-gif", "moving.gif", _animated_gif(), None),
]  # fmt: skip


def _image_files(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case, name, data, _ in IMAGES:
        (folder / name).write_bytes(data)
        paths[case] = str(folder / name)
    return paths


# -- subjects manifest rows ----------------------------------------------------------------------------------


def _subject_rows(good: dict, images: dict[str, str], folder: Path) -> list[tuple[str, dict, str | None]]:
    """(case, row, expected message) for every bad row; `good` is a valid row to start from."""
    cases = [
        ("null-subject-id", {"subject_id": None}, "subject_id is missing"),
        ("null-instance-prompt", {"instance_prompt": None}, "instance_prompt is missing"),
        ("null-instance-images", {"instance_images": None}, "instance_images is missing"),
        ("duplicate-id", {"subject_id": good["subject_id"]}, "duplicate subject_id, first seen at row 0"),
        ("id-with-slash", {"subject_id": "team/alice"}, "subject_id may only contain letters, digits"),
        ("id-dot-dot", {"subject_id": ".."}, "subject_id may only contain letters, digits"),
        ("id-with-spaces", {"subject_id": "alice smith"}, "subject_id may only contain letters, digits"),
        ("id-300-chars", {"subject_id": "a" * 300}, "up to 128 characters"),
        ("10000-images", {"instance_images": [images["cmyk-jpeg"]] * 10_000}, "has 10000 images, more than 64"),
        ("unknown-uri-scheme", {"instance_images": ["gopher://example.org/ball.png"]}, "unknown protocol 'gopher'"),
        ("uri-does-not-exist", {"instance_images": [str(folder / "nowhere.png")]}, "no such file"),
        ("params-not-json", {"params": "{max_train_steps: 4"}, "params: not valid JSON"),
        ("params-unknown-key", {"params": '{"lora_rnk": 4}'}, "params: unknown setting(s) 'lora_rnk'"),
        ("params-out-of-range", {"params": '{"max_train_steps": -5}'},
         "params: max_train_steps: Input should be greater than or equal to 1 (got -5)"),
        ("params-run-only-key", {"params": '{"max_attempts": 9}'}, "'max_attempts' can only be set for the whole run"),
        ("prompt-100000-chars", {"instance_prompt": "sks " * 25_000}, "100000 characters long, more than 10000"),
        ("negative-seed", {"seed": -1}, "seed must be between 0 and 2**63 - 1"),
        ("prompt-over-77-tokens", {"instance_prompt": "a photo of sks ball " * 6}, None),  # trains, with a warning
    ]  # fmt: skip
    rows = [(case, {**good, "subject_id": f"case-{case}", **change}, expect) for case, change, expect in cases]
    for case, _, _, expect in IMAGES:  # one subject per image, that image its only instance image
        rows.append((f"image-{case}", {**good, "subject_id": f"image-{case}", "instance_images": [images[case]]}, expect))
    return rows


def _with_non_utf8_prompt(path: str, rows: list[dict], index: int) -> None:
    """Parquet accepts any bytes in a string column; a real writer bug or a Latin-1 export puts them there."""
    write_subjects_manifest(path, rows)
    table = pq.read_table(path)
    prompts = table.column("instance_prompt").to_pylist()
    raw = [p if p is None or i != index else "caf\xe9 sks ball".encode("latin-1") for i, p in enumerate(prompts)]
    raw = pa.array([p.encode() if isinstance(p, str) else p for p in raw], pa.binary())
    table = table.set_column(table.column_names.index("instance_prompt"), "instance_prompt", raw.view(pa.string()))
    pq.write_table(table, path)


@pytest.mark.slow
def test_each_bad_subject_row_gets_its_reason_and_every_good_row_trains(ray_cluster, tmp_path, capsys):
    images = _image_files(tmp_path / "images")
    good_rows = make_subject_rows(tmp_path / "good", 2)
    cases = _subject_rows(good_rows[0], images, tmp_path)
    rows = [*good_rows, *(row for _, row, _ in cases)]
    rows.append({**good_rows[1], "subject_id": "case-non-utf8-text"})
    expected = {f"{i + len(good_rows)}": (case, e) for i, (case, _, e) in enumerate(cases)}
    expected[str(len(rows) - 1)] = ("non-utf8-text", "instance_prompt is not valid UTF-8 text")
    manifest = str(tmp_path / "subjects.parquet")
    _with_non_utf8_prompt(manifest, rows, len(rows) - 1)

    # validate: one line per bad row, with its row number and reason; the accepted images are not reported.
    assert main(["validate", manifest]) == 2
    lines = {line.split(" ", 2)[1].rstrip(":"): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("row ")}  # fmt: skip
    for row, (case, expect) in expected.items():
        if expect is None:
            assert row not in lines, (case, lines.get(row))
        else:
            assert expect in lines.get(row, ""), (case, expect, lines.get(row))

    # train: exit 1; each bad row failed (or rejected, without a folder of its own) with the same reason.
    run = RunDirectory(str(tmp_path / "run"))
    assert main(["train", manifest, "--out", run.uri, *FAST]) == 1
    statuses = run.read_statuses()
    outcome = {str(r["row"]): ("rejected", r["reason"]) for r in run.read_rejected_rows()}
    for index, row in enumerate(rows):
        status = statuses.get(row["subject_id"] or "")
        if str(index) not in outcome and status is not None:
            outcome[str(index)] = (status.state, status.error or "")
    for row, (case, expect) in expected.items():
        state, reason = outcome[row]
        if expect is None:
            assert state == "trained", (case, reason)
        else:
            assert state in ("failed", "rejected") and expect in reason, (case, expect, state, reason)
    assert statuses["s0"].state == statuses["s1"].state == "trained"
    # a prompt the text encoder cuts is not refused, nor silently cut: its subject and the report say by how much
    cut = "instance_prompt is 92 tokens long, over the 77 its text encoder reads: its last 15 tokens are cut"
    assert statuses["case-prompt-over-77-tokens"].warnings == [cut] and not statuses["s0"].warnings
    assert f"subject case-prompt-over-77-tokens: {cut}" in capsys.readouterr().err
    assert cut in Path(write_run_report(run.uri)).read_text()


# -- FLUX bases: a folder that is not a whole base stops the command; a setting the base cannot take fails its row --

FLUX_ROWS = [
    # case, the row's params, expected message
    ("lora-target-not-linear", {"lora_target_modules": ["norm1"]},
     "lora_target_modules: transformer.transformer_blocks.0.norm1 is a AdaLayerNormZero; LoRA targets must be Linear"),
    ("resolution-off-the-patch-grid", {"resolution": 33},
     "resolution: 33 is not a multiple of 2 (this base's VAE scale 1 x its 2x2 latent patches)"),
    ("text-encoder-training", {"train_text_encoder": True}, "train_text_encoder: not supported on FLUX bases"),
    ("negative-prompt-on-flux1", {"negative_prompt": "blurry"}, "negative_prompt: 'blurry' is not used by FLUX.1 bases"),
]  # fmt: skip


@pytest.mark.slow
def test_each_flux_setting_the_base_cannot_take_fails_its_row_and_the_good_row_trains(ray_cluster, tmp_path):
    good = make_subject_rows(tmp_path / "images", 1)[0]
    rows = [good, *({**good, "subject_id": f"case-{case}", "params": json.dumps(params)} for case, params, _ in FLUX_ROWS)]
    manifest, run = str(tmp_path / "subjects.parquet"), RunDirectory(str(tmp_path / "run"))
    write_subjects_manifest(manifest, rows)
    assert main(["train", manifest, "--out", run.uri, "--base-model", "tiny-flux", *FAST]) == 1
    statuses = run.read_statuses()
    assert statuses["s0"].state == "trained"
    for case, _, expect in FLUX_ROWS:
        status = statuses[f"case-{case}"]
        assert status.state == "failed" and expect in (status.error or ""), (case, status.state, status.error)


def test_a_flux_folder_missing_a_component_stops_the_command(model_cache, tmp_path, capsys):
    broken = tmp_path / "flux"
    shutil.copytree(resolve_base_model("tiny-flux", model_cache), broken)
    shutil.rmtree(broken / "text_encoder_2")
    manifest, run = str(tmp_path / "subjects.parquet"), tmp_path / "run"
    write_subjects_manifest(manifest, make_subject_rows(tmp_path / "images", 1))
    assert main(["train", manifest, "--out", str(run), "--base-model", str(broken), *FAST]) == 2
    assert f"{broken}: missing component folder 'text_encoder_2'" in capsys.readouterr().err and not run.exists()


# -- images manifest rows (a VLM pass) -----------------------------------------------------------------------


@pytest.mark.slow
def test_each_bad_image_row_gets_its_error_and_every_good_row_is_answered(ray_cluster, tmp_path):
    images = _image_files(tmp_path / "images")
    good = str(draw_subject(tmp_path / "good.png"))
    rows = [{"id": "good", "image": good, "image_bytes": None}]
    rows += [{"id": case, "image": images[case], "image_bytes": None} for case in images]
    rows += [
        {"id": "neither-column", "image": None, "image_bytes": None},
        {"id": "both-columns", "image": good, "image_bytes": Path(good).read_bytes()},
        {"id": "uri-does-not-exist", "image": str(tmp_path / "nowhere.png"), "image_bytes": None},
        {"id": "unknown-uri-scheme", "image": "gopher://example.org/doc.png", "image_bytes": None},
    ]
    expected = {case: expect for case, _, _, expect in IMAGES} | {
        "good": None,
        "neither-column": "the row has none of 'image', 'image_bytes', 'video'; give one",
        "both-columns": "the row has 'image' and 'image_bytes'; give exactly one",
        "uri-does-not-exist": "nowhere.png: no such file",
        "unknown-uri-scheme": "Protocol not known: gopher",
    }
    manifest, out = tmp_path / "manifest", tmp_path / "ocr.parquet"  # a folder of 4 files, as datasets come
    manifest.mkdir()
    schema = pa.Table.from_pylist(rows).schema
    for k in range(4):
        pq.write_table(pa.Table.from_pylist(rows[k::4], schema=schema), manifest / f"part-{k}.parquet")

    assert main(["analyze", str(manifest), "--task", "ocr", "--out", str(out), "--set", "vlm_rows_per_file=3"]) == 1
    answered = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(answered) == sorted(expected)  # every row out, once
    for rid, expect in expected.items():
        row = answered[rid]
        if expect is None:
            assert row["error"] is None and row["text"] is not None, (rid, row["error"])
        else:
            assert row["error"] and expect in row["error"], (rid, expect, row["error"])


# -- documents and videos: rows of an images manifest, a PDF a row per page -----------------------------------

DOCUMENTS: list[tuple[str, bytes, str | None]] = [
    # case, bytes of the PDF (an `image_bytes` row), expected message (None: every page answered)
    ("scanned-3-pages", media_files.scanned_pdf(3), None),
    ("portrait-and-landscape", media_files.text_pdf([media_files.A4, media_files.A4_LANDSCAPE]), None),
    ("truncated-pdf", media_files.scanned_pdf(3)[:300], "truncated or damaged beyond repair"),
    ("encrypted-pdf", media_files.encrypted_pdf(), "the PDF is encrypted and needs a password"),
    ("zero-pages", media_files.empty_pdf(), "the PDF has no pages"),
    ("3000-pages", media_files.many_pages_pdf(3000), "the PDF has 3000 pages, over the limit of 20 (pdf_max_pages)"),
    ("huge-page-bomb", media_files.huge_page_pdf(), "pixels at 144 dpi, over the limit of 64000000 (max_image_pixels)"),
    ("inflating-bomb", media_files.inflating_pdf(), "refused as a PDF bomb"),
    ("garbage-named-pdf", media_files.garbage(), "not an image in any format Pillow reads"),
]  # fmt: skip
VIDEOS: list[tuple[str, Callable[[Path], Path], str | None]] = [
    # case, writer of the file (a `video` row), expected message (None: answered)
    ("mp4", lambda p: media_files.write_video(p / "clip.mp4", seconds=2), None),
    ("phone-rotated", lambda p: media_files.write_video(p / "phone.mp4", seconds=2, rotation=90), None),
    ("no-frames", lambda p: media_files.write_video_without_frames(p / "empty.mp4"), "no decodable frames"),
    ("audio-only", lambda p: media_files.write_audio_only(p / "song.m4a"), "no video stream in the file"),
    ("huge-frame-size", lambda p: media_files.write_huge_header_video(p / "huge.mp4"),
     "16000x16000 = 256000000 pixels, over the limit of 64000000 (max_image_pixels)"),
    ("text-named-mp4", lambda p: _text_file(p / "notes.mp4"), "not a video FFmpeg can open"),
    ("over-long", lambda p: media_files.write_video(p / "long.mp4", seconds=6), "over the limit of 5 s (video_max_seconds)"),
]  # fmt: skip


def _text_file(path: Path) -> Path:
    path.write_text("minutes of the meeting, not a video\n")
    return path


@pytest.mark.slow
def test_each_bad_document_or_video_row_gets_its_error_and_every_good_page_and_video_is_answered(
    ray_cluster, tmp_path, capsys
):
    folder = tmp_path / "media"
    folder.mkdir()
    rows = [{"id": case, "image_bytes": data, "video": None} for case, data, _ in DOCUMENTS]
    rows += [{"id": case, "image_bytes": None, "video": str(write(folder))} for case, write, _ in VIDEOS]
    expected = {case: expect for case, _, expect in DOCUMENTS + VIDEOS}
    manifest, out = tmp_path / "media.parquet", tmp_path / "caption.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    limits = ["--set", "video_max_seconds=5"]  # the tiny preset's pdf_max_pages is 20

    assert main(["validate", str(manifest), "--kind", "images", *limits]) == 2
    printed = capsys.readouterr().out
    for case, expect in expected.items():
        assert (f"(id {case!r})" in printed) == (expect is not None), case
    assert main(["analyze", str(manifest), "--task", "caption", "--out", str(out), "--no-progress", *limits]) == 1
    answered: dict[str, list[dict]] = {}
    for row in pq.read_table(out).to_pylist():
        answered.setdefault(row["id"], []).append(row)
    assert sorted(answered) == sorted(expected)
    assert [r["page"] for r in answered["scanned-3-pages"]] == [1, 2, 3]
    assert sorted(r["page"] for r in answered["portrait-and-landscape"]) == [1, 2]
    for case, expect in expected.items():
        for row in answered[case]:
            if expect is None:
                assert row["error"] is None and row["caption"] is not None, (case, row["error"])
            else:
                assert len(answered[case]) == 1 and row["page"] is None, case  # one row per bad input
                assert expect in row["error"], (case, expect, row["error"])


# -- job-level: the whole command is refused before anything runs -------------------------------------------


def _subjects_file(tmp: Path, table: pa.Table | None = None, data: bytes | None = None) -> str:
    path = tmp / "subjects.parquet"
    if data is not None:
        path.write_bytes(data)
    else:
        pq.write_table(table, path)
    return str(path)


def _good_table(tmp: Path, **columns) -> pa.Table:
    rows = make_subject_rows(tmp / "images", 1)
    table = pa.Table.from_pylist(rows)
    for name, array in columns.items():
        table = table.set_column(table.column_names.index(name), name, array) if name in table.column_names else (
            table.append_column(name, array))
    return table


MANIFEST_FILES = [
    ("not-parquet", lambda tmp: _subjects_file(tmp, data=b"subject_id,instance_images\ns0,a.png\n"),
     "not a Parquet file"),
    ("no-such-file", lambda tmp: str(tmp / "missing.parquet"), "missing.parquet: no such file"),
    ("zero-rows", lambda tmp: _subjects_file(tmp, _good_table(tmp).slice(0, 0)), "no rows"),
    ("wrong-type", lambda tmp: _subjects_file(tmp, _good_table(tmp, subject_id=pa.array([7]))),
     "column 'subject_id' must be string, got int64"),
    ("images-not-a-list", lambda tmp: _subjects_file(tmp, _good_table(tmp, instance_images=pa.array(["a.png"]))),
     "column 'instance_images' must be list<string>, got string"),
    ("missing-column", lambda tmp: _subjects_file(tmp, _good_table(tmp).drop_columns(["instance_prompt"])),
     "missing required column(s) 'instance_prompt'"),
]  # fmt: skip


@pytest.mark.parametrize("make, message", [c[1:] for c in MANIFEST_FILES], ids=[c[0] for c in MANIFEST_FILES])
def test_a_manifest_file_that_cannot_be_used_stops_the_command(tmp_path, capsys, make, message):
    manifest, run = make(tmp_path), tmp_path / "run"
    assert main(["validate", manifest]) == 2
    assert message in capsys.readouterr().err
    assert main(["train", manifest, "--out", str(run), *FAST]) == 2
    assert message in capsys.readouterr().err and not run.exists()


IMAGES_FILES = [
    ("no-id-column", [{"image": "a.png"}], "no 'id' column"),
    ("duplicate-ids", [{"id": "a", "image": "a.png"}, {"id": "a", "image": "b.png"}],
     "duplicate ids, e.g. ['a'] ('a' in 2 rows of {manifest})"),
    ("no-image-column", [{"id": "a", "text": "hello"}], "needs an 'image' (URI), 'image_bytes' or 'video' (URI) column"),
    ("image-column-not-text", [{"id": "a", "image": 42}],
     "column 'image' must be string (a URI), got int64"),
    ("bytes-column-of-text", [{"id": "a", "image_bytes": "a.png"}],
     "column 'image_bytes' must be binary (the encoded file), got string"),
    # A folder of files: each list is one file
    ("duplicate-ids-across-files", [[{"id": "a", "image": "a.png"}], [{"id": "b", "image": "b.png"}, {"id": "a",
     "image": "c.png"}, {"id": "a", "image": "d.png"}]],
     "duplicate ids, e.g. ['a'] ('a' in {manifest}/part-0.parquet and {manifest}/part-1.parquet (2 rows))"),
    ("files-with-other-columns", [[{"id": "a", "image": "a.png"}], [{"id": "b", "image_bytes": b"x"}]],
     "its columns differ from"),
    ("empty-folder", [], "no Parquet files (*.parquet) found"),
]  # fmt: skip


@pytest.mark.parametrize("rows, message", [c[1:] for c in IMAGES_FILES], ids=[c[0] for c in IMAGES_FILES])
def test_an_images_manifest_that_cannot_be_used_stops_the_pass(tmp_path, capsys, rows, message):
    out = tmp_path / "out.parquet"
    if rows and isinstance(rows[0], dict):
        manifest = tmp_path / "images.parquet"
        pq.write_table(pa.Table.from_pylist(rows), manifest)
    else:
        manifest = tmp_path / "images"
        manifest.mkdir()
        for k, file_rows in enumerate(rows):
            pq.write_table(pa.Table.from_pylist(file_rows), manifest / f"part-{k}.parquet")
    message = message.replace("{manifest}", str(manifest))  # the files holding a duplicate are named
    assert main(["validate", str(manifest), "--kind", "images"]) == 2
    assert message in capsys.readouterr().err
    assert main(["analyze", str(manifest), "--task", "ocr", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists() and not Path(f"{out}.checkpoint").exists()
    assert not Path(f"{out}.lease.json").exists()  # a refused command leaves no lease behind


def test_an_images_manifest_with_non_utf8_ids_stops_the_pass(tmp_path, capsys):
    ids = pa.array([b"ok", b"caf\xe9"], pa.binary()).view(pa.string())
    manifest = tmp_path / "images.parquet"
    pq.write_table(pa.table({"id": ids, "image": ["a.png", "b.png"]}), manifest)
    assert main(["analyze", str(manifest), "--task", "ocr", "--out", str(tmp_path / "out.parquet")]) == 2
    assert "column 'id' holds text that is not valid UTF-8" in capsys.readouterr().err


SCHEMAS = [
    ("not-json", "{'type': 'object'", "not valid JSON"),
    ("invalid-json-schema", {"type": "object", "properties": {"total": {"type": "decimal"}}},
     "not a valid JSON Schema"),
    ("not-an-object", {"type": "array", "items": {"type": "string"}}, "must be an object with at least one property"),
    ("unsupported-keyword", {"type": "object", "properties": {"total": {"type": "integer", "not": {"const": 0}}}},
     "cannot enforce 'not' at #/properties/total"),
    ("remote-ref", {"type": "object", "properties": {"vendor": {"$ref": "https://example.org/vendor.json"}}},
     "non-local '$ref' 'https://example.org/vendor.json'"),
    ("1000-properties", {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(1000)}},
     "1000 properties; at most 256 are supported per pass"),
]  # fmt: skip


@pytest.mark.parametrize("schema, message", [c[1:] for c in SCHEMAS], ids=[c[0] for c in SCHEMAS])
def test_a_schema_that_cannot_be_enforced_stops_the_extraction(tmp_path, capsys, schema, message):
    manifest, out, schema_file = tmp_path / "images.parquet", tmp_path / "out.parquet", tmp_path / "schema.json"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "image": str(draw_subject(tmp_path / "a.png"))}]), manifest)
    schema_file.write_text(schema if isinstance(schema, str) else json.dumps(schema))
    args = ["analyze", str(manifest), "--task", "extract", "--schema", str(schema_file), "--out", str(out)]
    assert main(args) == 2
    assert message in capsys.readouterr().err and not out.exists()


CONFIGS = [
    ("unknown-key", "max_train_step: 10\n", "unknown setting(s) 'max_train_step'"),
    ("negative-steps", "max_train_steps: -10\n", "max_train_steps: Input should be greater than or equal to 1"),
    ("learning-rate-0", "learning_rate: 0\n", "learning_rate: Input should be greater than 0"),
    ("wrong-type", "num_inference_steps: lots\n", "num_inference_steps: Input should be a valid integer"),
    ("unknown-choice", "scheduler: pndm\n", "scheduler: Input should be 'ddim', 'dpmsolver++' or 'euler_a'"),
    ("not-a-mapping", "- max_train_steps\n", "a config file must be a mapping of setting names to values"),
    ("not-yaml", "max_train_steps: [4\n", "config.yaml: not valid YAML (while parsing a flow sequence)"),
    ("not-utf8", b"max_train_steps: 4 # caf\xe9\n", "config.yaml: cannot read"),
]  # fmt: skip


@pytest.mark.parametrize("text, message", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_a_config_that_cannot_be_used_stops_the_command(tmp_path, capsys, text, message):
    manifest, run, config = tmp_path / "m.parquet", tmp_path / "run", tmp_path / "config.yaml"
    write_subjects_manifest(str(manifest), make_subject_rows(tmp_path / "images", 1))
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["train", str(manifest), "--out", str(run), "--config", str(config)]) == 2
    assert message in capsys.readouterr().err and not run.exists()


@pytest.mark.parametrize("assignment, message", [
    ("max_train_steps", "--set 'max_train_steps': expected key=value"),
    ("lora_rank=0", "lora_rank: Input should be greater than or equal to 1"),
    ("no_such_setting=1", "unknown setting(s) 'no_such_setting'"),
    ("lora_rank=[4", "lora_rank: Input should be a valid integer"),
])  # fmt: skip
def test_a_bad_set_flag_stops_the_command(tmp_path, capsys, assignment, message):
    manifest, run = tmp_path / "m.parquet", tmp_path / "run"
    write_subjects_manifest(str(manifest), make_subject_rows(tmp_path / "images", 1))
    assert main(["train", str(manifest), "--out", str(run), "--set", assignment]) == 2
    assert message in capsys.readouterr().err and not run.exists()


# -- image URIs a new user writes: relative to the manifest, percent-encoded file:// URIs --------------------------


def test_relative_and_percent_encoded_image_uris_are_read(tmp_path, capsys, monkeypatch):
    """A relative path resolves against the manifest's folder (not the working directory); a `file://` URI as
    `Path.as_uri()` writes it (spaces and non-ASCII percent-encoded) names the file it encodes."""
    folder = tmp_path / "shoot 1"
    (folder / "photos").mkdir(parents=True)
    near = draw_subject(folder / "photos" / "ball.png")
    far = draw_subject(folder / "photos" / "bällchen 2.png", shift=2)
    rows = [{"subject_id": "s0", "instance_images": ["photos/ball.png", far.as_uri()],
             "instance_prompt": "a photo of sks ball", "class_prompt": "a photo of a ball"}]  # fmt: skip
    manifest = folder / "subjects.parquet"
    write_subjects_manifest(str(manifest), rows)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert "%20" in far.as_uri() and "%C3%A4" in far.as_uri()
    assert main(["validate", str(manifest)]) == 0, capsys.readouterr()
    subject = read_subjects_manifest(str(manifest), Settings(preset="tiny")).subjects[0]
    assert subject.instance_images[0] == str(near)
    assert storage.read_bytes(subject.instance_images[1]) == far.read_bytes()
