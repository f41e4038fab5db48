"""The report of a VLM pass output (ray_jobs/report/table_report.py): counts over the table, and sample rows with their
images, answers, pages, videos and boxes, read as a user reads them."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from ray_jobs.report import table_report
from tests.helpers.report_inputs import (
    BOX,
    CYAN,
    GREY,
    INJECTED,
    MODERATION_COLUMNS,
    SCRIPT,
    YELLOW,
    pass_output,
    png,
    two_page_pdf,
)
from tests.helpers.report_pages import Elements, dump_dom, near, run_chromium, sample_row, text, thumbnail

# -- moderation and OCR outputs --------------------------------------------------------------------------------------


def test_the_moderation_table_report_counts_errors_and_categories(tmp_path):
    image = tmp_path / "img.png"
    image.write_bytes(png((20, 120, 20)))
    errors = ["image decode failed"] * 5 + ["timeout"] * 3 + [f"rare error {i}" for i in range(12)]
    rows = [{"id": f"e{i}", "image": str(image), "error": e, "model": "tiny", "num_output_tokens": 0, "reasoning": None,
             "safe": None, "categories": None, "score": None} for i, e in enumerate(errors)]  # fmt: skip
    rows += [{"id": f"ok{i}", "image": str(image), "error": None, "model": "tiny", "num_output_tokens": 6,
              "reasoning": None, "safe": i % 3 != 0, "categories": ["S1", "S12"] if i % 3 == 0 else [],
              "score": 0.9 if i % 3 == 0 else 0.1} for i in range(30)]  # fmt: skip
    output = tmp_path / "moderated.parquet"  # a pass output: part files in a folder named like a file
    output.mkdir()
    table = pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("image", pa.string()),
                                                         *MODERATION_COLUMNS]))  # fmt: skip
    for k, start in enumerate(range(0, table.num_rows, 17)):
        pq.write_table(table.slice(start, 17), output / f"part-{k}.parquet")

    page = Path(table_report.write_table_report(str(output)))
    assert page == tmp_path / "moderated.report.html"
    html = page.read_text()
    assert "rows<b>50</b>" in html and "errors<b>20</b>" in html and "40.0%" in html
    assert "flagged<b>10</b>" in html and "safe<b>20</b>" in html
    top_rows = html.split('<tr class="top-error">')[1:]
    assert len(top_rows) == table_report.TOP_ERRORS
    assert top_rows[0].startswith("<td>5</td><td><pre>image decode failed")
    assert top_rows[1].startswith("<td>3</td><td><pre>timeout")
    assert "(10 of 14 distinct)" in html
    assert '<tr class="category"><td>S1</td><td>10</td></tr>' in html
    assert '<tr class="category"><td>S12</td><td>10</td></tr>' in html
    assert len(Elements(html).with_class("sample-image")) == table_report.SAMPLE_ROWS
    assert len(list((tmp_path / "moderated.report_files" / "thumbs").iterdir())) == 1  # one image, one thumbnail


def test_the_ocr_table_report_shows_text_as_text(tmp_path, chromium):
    text = f"TOTAL 12.50 EUR\n{SCRIPT}\n{INJECTED}\x00end"
    rows = [{"id": f"doc-{i}", "image_bytes": png((250, 250, 250), shift=i), "error": None, "model": "tiny",
             "num_output_tokens": 40, "reasoning": None, "text": text} for i in range(3)]  # fmt: skip
    rows.append({"id": SCRIPT, "image_bytes": b"not an image", "error": "cannot decode image", "model": "tiny",
                 "num_output_tokens": 0, "reasoning": None, "text": None})  # fmt: skip
    output = tmp_path / "ocr.parquet"
    pq.write_table(pa.Table.from_pylist(rows), output)

    page = Path(table_report.write_table_report(str(output)))
    dom = dump_dom(chromium, tmp_path, page)
    elements = Elements(dom)
    assert elements.named("script") == []
    assert not [attrs for _, attrs in elements.tags if "onerror" in attrs]
    assert "<title>dreamfleet VLM output" in dom and "pwned" not in dom.split("</title>")[0]
    shown = "TOTAL 12.50 EUR\n&lt;script&gt;alert(1)&lt;/script&gt;\n&lt;img src=x onerror=\"document.title='pwned'\"&gt;\ufffdend"
    assert dom.count(f'<pre class="ocr-text">{shown}</pre>') == 3
    assert "<td><code>&lt;script&gt;alert(1)&lt;/script&gt;</code></td>" in dom  # the id, too
    assert "\x00" not in page.read_text()
    assert len(list((tmp_path / "ocr.report_files" / "thumbs").iterdir())) == 3  # the bad row's image has none
    assert "errors<b>1</b>" in dom and "25.0%" in dom


# -- answers, boxes, pages and videos (vqa, detect, parse; PDF and video rows) ---------------------------------------


# Where the test photo's patches are, in pixels of the photo as it is seen (upright): it is 300 x 500 upright.
PHOTO_SIZE = (300, 500)
DOG, CAT = (40.0, 300.0, 160.0, 450.0), (180.0, 40.0, 280.0, 140.0)


def exif_rotated_photo(path: Path) -> Path:
    """A portrait photo stored on its side with EXIF orientation 6 (rotate 90° clockwise to view), as phones save it:
    a yellow patch at DOG and a cyan one at CAT once it is upright."""
    upright = Image.new("RGB", PHOTO_SIZE, GREY)
    ImageDraw.Draw(upright).rectangle(DOG, fill=YELLOW)
    ImageDraw.Draw(upright).rectangle(CAT, fill=CYAN)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: the viewer turns it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, "JPEG", quality=95, exif=exif)
    return path


def red_video(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for _ in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), (220, 30, 30), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def drawn_boxes(row_html: str) -> tuple[str, list[dict[str, str]], list[str]]:
    """A row's SVG overlay: its viewBox, its rects' attributes, and the labels written on them."""
    elements = Elements(row_html)
    (svg,) = elements.named("svg")
    labels = re.findall(r"<text [^>]*>([^<]*)</text>", row_html)
    return svg["viewbox"], elements.named("rect"), labels


def rect_box(rect: dict[str, str]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(rect[k]) for k in ("x", "y", "width", "height"))
    return x, y, x + w, y + h


def box(label: str, corners: tuple[float, float, float, float]) -> dict:
    return {"label": label, **dict(zip(("x1", "y1", "x2", "y2"), corners))}


@pytest.fixture
def detections(tmp_path) -> dict:
    photo = exif_rotated_photo(tmp_path / "photo.jpg")
    pdf = two_page_pdf(tmp_path / "doc.pdf")
    small = io.BytesIO()
    Image.new("RGB", (64, 32), CYAN).save(small, "PNG")
    rows = [
        {"id": "photo", "image": str(photo), "categories": "dog, cat", "boxes": [box("dog", DOG), box("cat", CAT)]},
        {"id": "doc", "image": str(pdf), "page": 1, "categories": "dog", "boxes": []},
        # Page 2 at the pass's 144 dpi is 400 x 800 px; its patch is at (100, 200)-(300, 400) px.
        {"id": "doc", "image": str(pdf), "page": 2, "categories": "dog", "boxes": [box("dog", (100, 200, 300, 400))]},
        {"id": "bytes", "image_bytes": small.getvalue(), "categories": "cat", "boxes": [box("cat", (0, 0, 32, 32))]},
        {"id": "bad", "image": str(tmp_path / "gone.jpg"), "categories": "dog", "error": "no such file"},
    ]
    output = pass_output(tmp_path / "detected.parquet", rows,
                         [("categories", pa.string()), ("boxes", pa.list_(BOX))])  # fmt: skip
    return {"output": output, "page": Path(table_report.write_table_report(str(output)))}


def test_boxes_are_drawn_where_they_are_on_the_upright_photo(detections):
    page = detections["page"]
    html = page.read_text()
    row = sample_row(html, "photo")
    view_box, rects, labels = drawn_boxes(row)
    # The photo is stored 500 x 300 on its side: the boxes are drawn in its upright 300 x 500 pixels.
    assert view_box == "0 0 300 500"
    assert [rect_box(r) for r in rects] == [DOG, CAT]
    assert labels == ["dog", "cat"]
    assert rects[0]["stroke"] != rects[1]["stroke"]
    # The thumbnail under them is upright too, scaled: each box's middle, scaled to the thumbnail, is its patch.
    thumb = thumbnail(page, row)
    assert thumb.size == (115, 192)
    for (x1, y1, x2, y2), colour in ((DOG, YELLOW), (CAT, CYAN)):
        middle = ((x1 + x2) / 2 * thumb.width / 300, (y1 + y2) / 2 * thumb.height / 500)
        assert near(thumb.getpixel(middle), colour)
    assert "2 boxes: cat × 1, dog × 1" in text(row)
    assert "(looked for: dog, cat)" in text(row)


def test_boxes_on_a_pdf_page_are_in_pixels_of_the_page_at_the_pass_dpi(detections, tmp_path):
    page = detections["page"]
    html = page.read_text()
    first, second = sample_row(html, "doc", 1), sample_row(html, "doc", 2)
    assert "no box found" in text(first) and "<svg" not in first
    view_box, rects, labels = drawn_boxes(second)
    assert view_box == "0 0 400 800" and [rect_box(r) for r in rects] == [(100, 200, 300, 400)] and labels == ["dog"]
    thumb = thumbnail(page, second)
    assert thumb.size == (96, 192)  # page 2 itself, upright, not page 1 (landscape)
    assert near(thumb.getpixel((48, 72)), YELLOW) and near(thumb.getpixel((10, 10)), (30, 30, 220))
    assert near(thumbnail(page, first).getpixel((10, 10)), (220, 30, 30))
    # Boxes from a pass run at another pdf_dpi are drawn in pixels of the page at that resolution.
    other = Path(table_report.write_table_report(str(detections["output"]), str(tmp_path / "at72.html"), pdf_dpi=72))
    assert drawn_boxes(sample_row(other.read_text(), "doc", 2))[0] == "0 0 200 400"
    assert drawn_boxes(sample_row(other.read_text(), "photo"))[0] == "0 0 300 500"  # a photo is no PDF


def test_boxes_are_counted_per_label_and_the_categories_text_is_not_a_moderation_count(detections):
    html = detections["page"].read_text()
    assert "rows<b>5</b>" in html and "errors<b>1</b>" in html and "boxes<b>4</b>" in html
    assert "PDF pages<b>2</b>" in html
    assert '<tr class="box-label"><td>cat</td><td>2</td><td>2</td></tr>' in html
    assert '<tr class="box-label"><td>dog</td><td>2</td><td>2</td></tr>' in html
    assert "4 boxes in 4 answered rows" in html
    assert "Moderation categories" not in html  # detect's `categories` is its input's labels, not verdict codes
    assert drawn_boxes(sample_row(html, "bytes"))[0] == "0 0 64 32"
    assert "<svg" not in sample_row(html, "bad") and "image unavailable" in sample_row(html, "bad")


def test_a_rerun_reuses_the_thumbnails_and_still_draws_the_boxes_in_place(detections):
    thumbs = detections["page"].parent / "detected.report_files" / "thumbs"
    made = {p.name: p.stat().st_mtime_ns for p in thumbs.iterdir()}
    assert len(made) == 4  # the photo, each page of the PDF, the bytes
    time.sleep(0.01)
    html = Path(table_report.write_table_report(str(detections["output"]))).read_text()
    assert {p.name: p.stat().st_mtime_ns for p in thumbs.iterdir()} == made
    assert drawn_boxes(sample_row(html, "photo"))[0] == "0 0 300 500"
    assert drawn_boxes(sample_row(html, "doc", 2))[0] == "0 0 400 800"


def test_a_user_sees_each_box_around_its_patch(chromium, tmp_path):
    photo = exif_rotated_photo(tmp_path / "photo.jpg")
    rows = [{"id": "photo", "image": str(photo), "categories": "dog, cat", "boxes": [box("dog", DOG), box("cat", CAT)]}]
    output = pass_output(tmp_path / "one.parquet", rows, [("categories", pa.string()), ("boxes", pa.list_(BOX))])
    page = Path(table_report.write_table_report(str(output)))
    shot = tmp_path / "boxes.png"
    run_chromium(chromium, tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1000,1000",
                 "--hide-scrollbars", "--force-device-scale-factor=1")  # fmt: skip
    image = Image.open(shot).convert("RGB")
    pixels = np.asarray(image, dtype=np.int32)
    rects = drawn_boxes(sample_row(page.read_text(), "photo"))[1]
    for patch, rect in zip((YELLOW, CYAN), rects):
        stroke = tuple(int(rect["stroke"][i : i + 2], 16) for i in (1, 3, 5))
        # The patch as the screenshot shows it (the photo's thumbnail is the only place with its colour)...
        ys, xs = np.nonzero(np.abs(pixels - np.array(patch)).sum(axis=2) <= 40)
        left, top, right, bottom = xs.min(), ys.min(), xs.max(), ys.max()
        middle_x, middle_y = (left + right) // 2, (top + bottom) // 2
        # ...has the box's stroke on each of its four edges (the label is written inside, at the top left).
        edges = {"left": [(left + d, middle_y) for d in range(-3, 4)],
                 "right": [(right + d, middle_y) for d in range(-3, 4)],
                 "top": [(middle_x, top + d) for d in range(-3, 4)],
                 "bottom": [(middle_x, bottom + d) for d in range(-3, 4)]}  # fmt: skip
        for edge, around in edges.items():
            assert any(near(image.getpixel(p), stroke, 90) for p in around), (patch, edge)


def test_answers_show_their_questions_and_pages_and_videos_are_rows_of_their_own(tmp_path, chromium):
    photo = exif_rotated_photo(tmp_path / "photo.jpg")
    pdf = two_page_pdf(tmp_path / "doc.pdf")
    video = red_video(tmp_path / "clip.mp4")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 50)
    rows = [
        {"id": "photo", "image": str(photo), "question": "What is at the top right?",
         "answer": f"A cyan square {SCRIPT}"},
        {"id": "doc", "image": str(pdf), "page": 1, "question": "What colour is this page?", "answer": "Red."},
        {"id": "doc", "image": str(pdf), "page": 2, "question": "What colour is this page?", "answer": "Blue."},
        {"id": "clip", "video": str(video), "question": "What happens?", "answer": "The screen stays red."},
        {"id": "short", "image": str(pdf), "page": 3, "question": "And this one?", "answer": "Green."},
        {"id": "broken", "image": str(broken), "question": "Anything?", "error": "not a readable PDF"},
    ]
    output = pass_output(tmp_path / "answered.parquet", rows, [("question", pa.string()), ("answer", pa.string())])
    page = Path(table_report.write_table_report(str(output)))
    dom = dump_dom(chromium, tmp_path, page)
    assert Elements(dom).named("script") == []

    photo_row = sample_row(dom, "photo")
    assert "Q: What is at the top right? A: A cyan square &lt;script&gt;alert(1)&lt;/script&gt;" in text(photo_row)
    assert thumbnail(page, photo_row).size == (115, 192)  # upright
    first, second = sample_row(dom, "doc", 1), sample_row(dom, "doc", 2)
    assert "A: Red." in text(first) and "A: Blue." in text(second)
    assert '<span class="page">page 1</span>' in first and '<span class="page">page 2</span>' in second
    assert near(thumbnail(page, first).getpixel((5, 5)), (220, 30, 30))
    assert near(thumbnail(page, second).getpixel((5, 5)), (30, 30, 220))

    clip = sample_row(dom, "clip")
    assert "A: The screen stays red." in text(clip)
    assert 'href="clip.mp4"' in clip and f"<code>{video}</code>" in clip  # the video's URI, linked
    assert near(thumbnail(page, clip).getpixel((20, 20)), (220, 30, 30))  # its first frame
    # A page the PDF does not have and a PDF PDFium cannot open are notes on their rows, not a failed report.
    assert "image unavailable" in sample_row(dom, "short") and "has 2 pages, no page 3" in sample_row(dom, "short")
    assert "cannot open the PDF: it is truncated or damaged beyond repair" in sample_row(dom, "broken")
    assert "rows<b>6</b>" in dom and "errors<b>1</b>" in dom and "PDF pages<b>3</b>" in dom and "videos<b>1</b>" in dom


def test_an_answer_without_a_question_column_and_a_video_that_will_not_decode(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    rows = [{"id": "clip", "video": str(tmp_path / "noise.mp4"), "answer": "No idea."}]
    output = pass_output(tmp_path / "asked.parquet", rows, [("answer", pa.string())])
    page = Path(table_report.write_table_report(str(output)))
    row = sample_row(page.read_text(), "clip")
    assert "A: No idea." in text(row) and 'class="question"' not in row
    assert "image unavailable" in row and "noise.mp4" in row


def test_parsed_markdown_is_shown_as_preformatted_text_never_as_html(tmp_path, chromium):
    markdown = f"# Invoice\n\n| item | price |\n| --- | --- |\n| {INJECTED} | 3 |\n\n{SCRIPT}\n**total**\x00"
    rows = [{"id": f"page-{i}", "image_bytes": png((250, 250, 250), shift=i), "markdown": markdown} for i in range(2)]
    page = Path(table_report.write_table_report(str(pass_output(tmp_path / "parsed.parquet", rows,
                                                          [("markdown", pa.string())]))))  # fmt: skip
    dom = dump_dom(chromium, tmp_path, page)
    elements = Elements(dom)
    assert elements.named("script") == [] and elements.named("strong") == []
    assert len(elements.named("h1")) == 1  # the report's own title; the markdown's heading is text
    assert not [attrs for _, attrs in elements.tags if "onerror" in attrs]
    shown = ("# Invoice\n\n| item | price |\n| --- | --- |\n"
             "| &lt;img src=x onerror=\"document.title='pwned'\"&gt; | 3 |\n\n&lt;script&gt;alert(1)&lt;/script&gt;\n"
             "**total**\ufffd")
    assert dom.count(f'<pre class="markdown">{shown}</pre>') == 2
    assert "pwned" not in dom.split("</title>")[0]
