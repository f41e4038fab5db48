"""`dreamfleet analyze` over PDFs and videos, and the vqa, detect and parse tasks, end to end on the tiny Qwen3-VL."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_jobs.cli import main
from samples.media_files import A4, scanned_pdf, text_pdf, write_video

MANIFEST = pa.schema([("id", pa.string()), ("image", pa.string()), ("image_bytes", pa.binary()),
                      ("video", pa.string()), ("question", pa.string()), ("categories", pa.string())])  # fmt: skip
TEXT_TASKS = {"caption": "caption", "moderate": "safe"}


A4_PX = (1191, 1684)  # an A4 page at the default 144 dpi


def write_pdf(path: Path, pages: int) -> Path:
    path.write_bytes(text_pdf([A4] * pages))
    return path


def _jpeg_rotated(path: Path, stored=(120, 60)) -> Path:
    """A phone photo: stored landscape, EXIF orientation 6 (rotate 90° clockwise to view), so upright 60 × 120."""
    image = Image.new("RGB", stored, "orange")
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", exif=exif)
    return path


def _manifest(folder: Path, categories: bool = True) -> tuple[str, dict[str, list[int | None]], dict[str, str]]:
    """A manifest of every input kind, good and bad: (its path, the pages each good id must give, bad id → error).
    Without `categories` for moderation, whose own `categories` output column it would clash with."""
    folder.mkdir(parents=True, exist_ok=True)
    pdf3 = write_pdf(folder / "contract.pdf", pages=3)
    pdf2 = scanned_pdf(pages=2)
    clip = write_video(folder / "clip.mp4", seconds=2, fps=8)
    photo = _jpeg_rotated(folder / "phone.jpg")
    (folder / "cut.pdf").write_bytes(pdf3.read_bytes()[:200])
    (folder / "notes.mp4").write_text("this is a text file, not a video\n")
    rows = [
        {"id": "photo", "image": str(photo), "question": "What colour is it?", "categories": "cat,dog"},
        {"id": "contract", "image": str(pdf3)},
        {"id": "pdf-bytes", "image_bytes": pdf2, "question": "Who signs?"},
        {"id": "clip", "video": str(clip)},
        {"id": "cut-pdf", "image": str(folder / "cut.pdf")},
        {"id": "fake-video", "video": str(folder / "notes.mp4")},
        {"id": "two-kinds", "image": str(photo), "video": str(clip)},
    ]
    path = folder / "manifest.parquet"
    table = pa.Table.from_pylist(rows, schema=MANIFEST)
    pq.write_table(table if categories else table.drop_columns(["categories"]), path)
    pages = {"photo": [None], "contract": [1, 2, 3], "pdf-bytes": [1, 2], "clip": [None]}
    bad = {"cut-pdf": "cut.pdf", "fake-video": "notes.mp4", "two-kinds": "give exactly one"}
    return str(path), pages, bad


def _pages(table: pa.Table) -> dict[str, list[int | None]]:
    found: dict[str, list[int | None]] = {}
    for row in table.select(["id", "page"]).to_pylist():
        found.setdefault(row["id"], []).append(row["page"])
    return {k: sorted(v, key=lambda p: p or 0) for k, v in found.items()}


# caption and ocr differ only in their prompt, and vqa's video rows are asked in the S3 test: two tasks cover the path.
@pytest.mark.parametrize("task", ["caption", "moderate"])
def test_pdf_pages_become_rows_and_videos_are_answered(ray_cluster, tmp_path, task):
    manifest, pages, bad = _manifest(tmp_path / "in", categories=task != "moderate")
    out = tmp_path / f"{task}.parquet"
    assert main(["analyze", manifest, "--task", task, "--out", str(out), "--no-progress",
                 "--set", "vlm_rows_per_file=3"]) == 1  # fmt: skip
    table = pq.read_table(out)
    assert table.schema.field("page").type == pa.int32()
    assert _pages(table) == {**pages, **{rid: [None] for rid in bad}}  # a row per page; one row per bad input
    rows = {(r["id"], r["page"]): r for r in table.to_pylist()}
    for rid, fragment in bad.items():
        assert fragment in rows[(rid, None)]["error"], rows[(rid, None)]["error"]
    for rid, numbers in pages.items():
        for page in numbers:
            row = rows[(rid, page)]
            assert row["error"] is None and row["num_output_tokens"] > 0, (rid, page, row["error"])
            assert row[TEXT_TASKS[task]] is not None


def test_tasks_that_read_images_only_refuse_video_rows_alone(ray_cluster, tmp_path):
    manifest, pages, bad = _manifest(tmp_path / "in")
    out = tmp_path / "parse.parquet"
    assert main(["analyze", manifest, "--task", "parse", "--out", str(out), "--no-progress"]) == 1
    rows = {(r["id"], r["page"]): r for r in pq.read_table(out).to_pylist()}
    assert "does not take video rows" in rows[("clip", None)]["error"]
    assert all(rows[("contract", p)]["markdown"] is not None for p in (1, 2, 3))


@pytest.mark.parametrize("model", ["tiny", "tiny-moe-thinking"])
def test_detect_boxes_lie_in_the_upright_image_and_use_only_the_asked_labels(ray_cluster, tmp_path, model):
    manifest, pages, _ = _manifest(tmp_path / "in")
    out = tmp_path / "detect.parquet"
    main(["analyze", manifest, "--task", "detect", "--categories", "signature,stamp", "--vlm-model", model,
          "--out", str(out), "--no-progress"])  # fmt: skip
    rows = {(r["id"], r["page"]): r for r in pq.read_table(out).to_pylist()}
    photo = rows[("photo", None)]
    assert photo["error"] is None
    for box in photo["boxes"]:  # the row's own categories win; upright 60 wide, 120 tall
        assert box["label"] in ("cat", "dog")
        assert 0 <= box["x1"] <= box["x2"] <= 60 and 0 <= box["y1"] <= box["y2"] <= 120
    for page in (1, 2, 3):  # an A4 page at 144 dpi: 1191 x 1684 px
        row = rows[("contract", page)]
        assert row["error"] is None
        for box in row["boxes"]:
            assert box["label"] in ("signature", "stamp")
            assert 0 <= box["x1"] <= box["x2"] <= 1191 and 0 <= box["y1"] <= box["y2"] <= 1684
    if model.endswith("thinking"):
        assert photo["reasoning"] is not None


def test_vqa_asks_each_row_its_own_question_or_refuses_before_running(ray_cluster, tmp_path, capsys):
    manifest, pages, _ = _manifest(tmp_path / "in")
    out = tmp_path / "vqa.parquet"
    main(["analyze", manifest, "--task", "vqa", "--out", str(out), "--no-progress"])
    rows = {(r["id"], r["page"]): r for r in pq.read_table(out).to_pylist()}
    assert rows[("photo", None)]["error"] is None and rows[("photo", None)]["question"] == "What colour is it?"
    assert "question" in rows[("contract", 1)]["error"]  # no question of its own and no --question

    no_questions = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ["a"], "image": [str(tmp_path / "in" / "phone.jpg")]}), no_questions)
    assert main(["analyze", str(no_questions), "--task", "vqa", "--out", str(tmp_path / "v2.parquet")]) == 2
    assert "--question" in capsys.readouterr().err


def test_a_pdf_split_over_part_files_resumes_page_by_page(ray_cluster, tmp_path, monkeypatch):
    """A PDF's pages land in several part files, each committed alone. A write killed before its commit (recreated
    as in test_analyze.py) must cost exactly its pages: after the rerun every page is there once, none lost, none twice."""
    folder = tmp_path / "in"
    folder.mkdir()
    pdf = write_pdf(folder / "long.pdf", pages=5)
    manifest = folder / "m.parquet"
    pq.write_table(pa.table({"id": ["long", "photo"], "image": [str(pdf), str(_jpeg_rotated(folder / "p.jpg"))]}),
                   manifest)  # fmt: skip
    out = tmp_path / "ocr.parquet"
    args = ["analyze", str(manifest), "--task", "ocr", "--out", str(out), "--no-progress",
            "--set", "vlm_batch_size=2", "--set", "vlm_rows_per_file=1"]  # fmt: skip
    # Ray splits blocks at 128 MiB: a long PDF at a real pixel budget (3.9 MB a page at 1280 tokens) spans blocks,
    # and so write tasks. Blocks of 64 KiB do the same to the tiny budget's 49 KB pages.
    context = ray_cluster.data.DataContext.get_current()
    monkeypatch.setattr(context, "target_max_block_size", 64 * 1024)
    assert main(args) == 0
    checkpoint = Path(f"{out}.checkpoint")
    committed = sorted(checkpoint.glob("*.parquet"))
    assert len(committed) >= 3
    victim = next(f for f in committed if "long" in pq.read_table(f).column("id").to_pylist())
    stem = victim.name.removesuffix(".parquet")
    lost = [p for f in out.glob(f"{stem}*.parquet") for p in pq.read_table(f).column("page").to_pylist()]
    assert any(p is not None for p in lost)  # the victim holds pages of the PDF
    victim.rename(victim.with_name(stem + ".pending.parquet"))

    assert main(args) == 0
    table = pq.read_table(out)
    assert sorted(_pages(table)["long"]) == [1, 2, 3, 4, 5]  # each page once: none lost, none twice
    assert _pages(table)["photo"] == [None]
    assert table.num_rows == 6


def test_pdfs_and_videos_on_the_s3_api_server_and_the_output_there(ray_cluster, tmp_path):
    import pyarrow.dataset as pds
    import s3fs

    from engine import storage

    fs = s3fs.S3FileSystem()
    fs.mkdir("dreamfleet-media")
    storage.write_bytes("s3://dreamfleet-media/in/contract.pdf", text_pdf([A4] * 2))
    storage.write_bytes("s3://dreamfleet-media/in/clip.mp4", write_video(tmp_path / "clip.mp4", seconds=2).read_bytes())
    rows = [{"id": "contract", "image": "s3://dreamfleet-media/in/contract.pdf"},
            {"id": "clip", "video": "s3://dreamfleet-media/in/clip.mp4"}]  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST), sink)
    storage.write_bytes("s3://dreamfleet-media/manifest/part-0.parquet", sink.getvalue().to_pybytes())
    out = "s3://dreamfleet-media/out/vqa.parquet"
    assert main(["analyze", "s3://dreamfleet-media/manifest/", "--task", "vqa", "--question", "What is it?",
                 "--out", out, "--no-progress"]) == 0  # fmt: skip
    table = pds.dataset("dreamfleet-media/out/vqa.parquet", filesystem=fs, format="parquet").to_table()
    assert _pages(table) == {"contract": [1, 2], "clip": [None]}
    assert table.column("error").null_count == 3 and None not in table.column("answer").to_pylist()
