"""Thumbnails (ray_jobs/report/thumbnails.py): files beside the report, made once, upright, and refused where the pass
refuses the image."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
from PIL import Image

from ray_jobs.report import pages, run_report, table_report, thumbnails
from tests.helpers.report_inputs import pass_output, two_page_pdf
from tests.helpers.report_pages import Elements, near, sample_row, thumbnail


def test_thumbnails_are_files_beside_the_report_reused_by_a_rerun(small_run):
    thumbs = small_run["report"].parent / "report_files" / "thumbs"
    made = {p.name: p.stat().st_mtime_ns for p in thumbs.iterdir()}
    assert len(made) == 3 * 3 + 5  # every instance image and every generated one
    assert all(Image.open(thumbs / name).size[0] <= thumbnails.THUMBNAIL_SIZE for name in made)
    html = small_run["report"].read_text()
    assert "data:image" not in html and "base64" not in html
    srcs = [img["src"] for img in Elements(html).named("img")]
    assert srcs and all(src.startswith("report_files/thumbs/") for src in srcs)  # relative: the folder can move
    assert 'href="subjects/alpha/images/p0000-i0000.png"' in html  # a thumbnail opens the full-size image

    time.sleep(0.01)
    run_report.write_run_report(small_run["run"])
    assert {p.name: p.stat().st_mtime_ns for p in thumbs.iterdir()} == made


def test_pdf_pages_are_refused_like_the_pass_refuses_them(tmp_path):
    pdf = str(two_page_pdf(tmp_path / "doc.pdf"))
    layout = pages.ReportLayout(pages.canonical_uri(str(tmp_path / "r.html")))
    few_pages = thumbnails.ThumbnailStore(layout, pdf_max_pages=1)
    refused = few_pages.for_uri(pdf, page=1)
    few_pages.make_pending()
    assert refused.thumb is None and "the PDF has 2 pages, over the limit of 1 (pdf_max_pages)" in refused.problem
    # Page 2 at 144 dpi is 400 x 800 px; the thumbnail is rendered small, but the page is refused as the pass would,
    # and with it the whole document (the pass makes it one error row).
    few_pixels = thumbnails.ThumbnailStore(layout, max_pixels=400 * 800 - 1)
    big, small = few_pixels.for_uri(pdf, page=2), few_pixels.for_uri(pdf, page=1, sized=True)
    few_pixels.make_pending()
    assert big.thumb is None and "page 2 is 400x800 = 320000 pixels at 144 dpi, over the limit" in big.problem
    assert small.thumb is None and big.problem == small.problem
    enough = thumbnails.ThumbnailStore(layout, max_pixels=400 * 800)
    page_one = enough.for_uri(pdf, page=1, sized=True)
    enough.make_pending()
    assert page_one.problem is None and page_one.size == (600, 400)


def test_a_mirrored_sideways_phone_video_gets_an_upright_thumbnail(tmp_path):
    from samples.media_files import write_video

    video = write_video(tmp_path / "phone.mp4", width=48, height=80, rotation=90, hflip=True, seconds=0.5)
    rows = [{"id": "phone", "video": str(video), "answer": "A red corner."}]
    page = Path(table_report.write_table_report(str(pass_output(tmp_path / "asked.parquet", rows, [("answer", pa.string())]))))
    thumb = thumbnail(page, sample_row(page.read_text(), "phone")).convert("RGB")
    assert thumb.size == (48, 80)  # upright: portrait, as the phone showed it
    assert near(thumb.getpixel((6, 10)), (255, 0, 0)) and not near(thumb.getpixel((42, 10)), (255, 0, 0))
