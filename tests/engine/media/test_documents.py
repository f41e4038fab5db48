"""engine/documents.py on real PDFs: pages, sizes at a dpi, resume skips, and every hostile file refused."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
import pytest

from engine.media.documents import DocumentError, count_pages, is_pdf, render_pages
from engine.media.images import ImageError
from samples import media_files
from samples.media_files import A4, A4_LANDSCAPE

LIMITS = dict(dpi=144, max_pages=200, max_pixels=64_000_000, render_pixels=4_000_000)
COUNT_LIMITS = dict(dpi=144, max_pages=200, max_pixels=64_000_000)


def render(data: bytes, **overrides) -> list:
    return list(render_pages(data, name="doc.pdf", **(LIMITS | overrides)))


def dark(image, box) -> float:
    """The fraction of dark pixels in a box of the image."""
    return float((np.asarray(image.crop(box).convert("L")) < 100).mean())


def test_is_pdf_finds_the_header_within_the_first_1024_bytes():
    assert is_pdf(b"%PDF-1.7\n")
    assert is_pdf(b"\0" * 1000 + b"%PDF-1.4")
    assert not is_pdf(b"\0" * 1025 + b"%PDF-1.4")
    assert not is_pdf(b"%PS-Adobe-3.0") and not is_pdf(b"")


def test_pages_are_numbered_from_one_and_sized_at_the_dpi():
    pages = render(media_files.text_pdf([A4, A4_LANDSCAPE, (612, 792)]))
    assert [page.number for page in pages] == [1, 2, 3]
    # A4 at 144 dpi: 595.276 x 841.89 pt x 2 px/pt; US Letter is 8.5 x 11 in.
    assert [(page.width, page.height) for page in pages] == [(1191, 1684), (1684, 1191), (1224, 1584)]
    for page in pages:
        assert page.image.mode == "RGB"
        assert abs(page.image.width - page.width) <= 1 and abs(page.image.height - page.height) <= 1


def test_pages_are_drawn_upright_as_a_viewer_shows_them():
    portrait, turned = render(media_files.text_pdf([A4, A4], rotate={2: 90}), dpi=72)
    assert (portrait.width, portrait.height) == (595, 842) and (turned.width, turned.height) == (842, 595)
    square = media_files.SQUARE_PT  # drawn in the page's top-left corner
    assert dark(portrait.image, (0, 0, square, square)) > 0.95
    assert dark(portrait.image, (portrait.width - square, 0, portrait.width, square)) == 0
    # /Rotate 90 turns the page clockwise for display: its top-left corner is now top-right.
    assert dark(turned.image, (turned.width - square, 0, turned.width, square)) > 0.95
    assert dark(turned.image, (0, 0, square, square)) == 0
    assert 0.001 < dark(portrait.image, (100, 100, 400, 160)) < 0.5  # "Page 1" in Helvetica


def test_a_scanned_pdf_renders_its_images():
    pages = render(media_files.scanned_pdf(pages=3), dpi=150)
    assert [(page.number, page.width, page.height) for page in pages] == [(n, 1240, 1754) for n in (1, 2, 3)]
    assert all(0.05 < dark(page.image, (0, 0, page.width, page.height)) < 0.5 for page in pages)  # lines of text


@pytest.mark.parametrize("render_pixels", [10_000, 123_457, 1_000_000])
def test_renders_are_scaled_down_to_render_pixels_keeping_size_and_aspect(render_pixels):
    pages = render(media_files.text_pdf([A4, A4_LANDSCAPE]), render_pixels=render_pixels)
    for page in pages:
        area = page.image.width * page.image.height
        assert 0.97 * render_pixels <= area <= render_pixels
        assert page.image.width / page.image.height == pytest.approx(page.width / page.height, rel=0.02)
    assert [(page.width, page.height) for page in pages] == [(1191, 1684), (1684, 1191)]  # boxes' coordinates


def test_skipped_pages_are_not_rendered():
    data = media_files.text_pdf([A4, A4_LANDSCAPE, A4])
    assert [page.number for page in render(data, skip={1, 3})] == [2]
    assert render(data, skip={1, 2, 3}) == []


def test_count_pages_needs_no_rendering():
    assert count_pages(media_files.text_pdf([A4] * 7), name="doc.pdf", **COUNT_LIMITS) == 7


def test_an_encrypted_test_file_is_real():
    assert len(pdfium.PdfDocument(media_files.encrypted_pdf(), password="secret")) == 1


def _truncated() -> bytes:
    data = media_files.text_pdf([A4] * 5)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: b"", r"doc.pdf: empty file \(0 bytes\)"),
        (media_files.garbage, r"doc.pdf: not a PDF \(no %PDF- header in its first 1024 bytes; it starts with b'"),
        (lambda: b"%PDF-1.7\n" + media_files.garbage(), r"doc.pdf: cannot open the PDF: it is truncated or damaged"),
        (_truncated, r"doc.pdf: cannot open the PDF: it is truncated or damaged beyond repair \(no %%EOF at its "
                     r"end; PDFium: data format error\)"),  # fmt: skip
        (media_files.encrypted_pdf, r"doc.pdf: the PDF is encrypted and needs a password$"),
        (media_files.empty_pdf, r"doc.pdf: the PDF has no pages$"),
        (media_files.many_pages_pdf, r"doc.pdf: the PDF has 3000 pages, over the limit of 200 \(pdf_max_pages\)$"),
        (media_files.inflating_pdf, r"doc.pdf: refused as a PDF bomb: the stream at byte \d+ inflates to more "
                                    r"than 67108864 bytes$"),  # fmt: skip
        (lambda: media_files.inflating_pdf(nested=True),
         r"doc.pdf: refused as a PDF bomb: the stream at byte \d+ inflates to more than 67108864 bytes \(Flate inside "
         r"Flate\)$"),
    ],
    ids=["empty", "garbage", "garbage-after-header", "truncated", "encrypted", "no-pages", "3000-pages",
         "inflation-bomb", "nested-inflation-bomb"],
)  # fmt: skip
def test_bad_pdfs_are_refused_fast_with_the_reason(build, message):
    data = build()
    with pytest.raises(DocumentError, match=message):
        render(data)
    with pytest.raises(DocumentError, match=message):
        count_pages(data, name="doc.pdf", **COUNT_LIMITS)


def test_one_refusal_does_not_colour_the_reasons_for_the_next():
    # PDFium keeps its last error across documents and sets none for an empty page tree.
    for build, reason in [(media_files.encrypted_pdf, "encrypted"), (media_files.empty_pdf, "no pages")] * 2:
        with pytest.raises(DocumentError, match=reason):
            render(build())


def test_a_huge_page_is_refused_from_its_size_before_rendering():
    data = media_files.huge_page_pdf()  # 14400 pt square, the PDF maximum: 28800^2 px, 3.3 GB as RGBA at 144 dpi
    with pytest.raises(DocumentError, match=r"doc.pdf: page 1 is 28800x28800 = 829440000 pixels at 144 dpi, over the "
                                            r"limit of 64000000 \(max_image_pixels\)$"):  # fmt: skip
        render(data)
    with pytest.raises(DocumentError, match="over the limit of 64000000"):  # validation refuses it the same way
        count_pages(data, name="doc.pdf", **COUNT_LIMITS)


def test_a_bomb_page_anywhere_fails_the_document_before_any_page_is_rendered():
    pages = render_pages(media_files.text_pdf([A4, (14400, 14400)]), name="doc.pdf", **LIMITS)
    with pytest.raises(DocumentError, match="page 2 is 28800x28800"):
        next(pages)


def test_a_page_that_cannot_be_read_fails_the_document():
    # The page tree claims a page it does not have: PDFium counts it, then cannot load it.
    data = media_files.pdf_file([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 1 >>"])
    with pytest.raises(DocumentError, match="doc.pdf: page 1 cannot be read"):
        render(data)


def test_streams_within_the_inflation_limit_render():
    content = b"0 0 0 rg 0 769.89 72 72 re f\n" + b"% padding that compresses well\n" * 70_000  # 2.2 MB inflated
    data = media_files.pdf_file([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595.276 841.89] /Contents 4 0 R >>",
        media_files.pdf_stream(zlib.compress(content), b"/Filter /FlateDecode"),
    ])  # fmt: skip
    (page,) = render(data, dpi=72)
    assert dark(page.image, (0, 0, 72, 72)) > 0.95
    with pytest.raises(DocumentError, match="inflates to more than 1048576 bytes"):
        render(data, max_stream_bytes=2**20)


def test_the_inflation_bomb_is_refused_in_bounded_memory(tmp_path: Path):
    """In a fresh process, so that its peak memory is this refusal's alone (PDFium would take ~20 GB here)."""
    path = tmp_path / "bomb.pdf"
    path.write_bytes(media_files.inflating_pdf(inflated_mib=1024))
    script = f"""
import time
from engine.media.documents import DocumentError, render_pages
data = open({str(path)!r}, "rb").read()
started = time.perf_counter()
try:
    list(render_pages(data, name="bomb.pdf", dpi=144, max_pages=200, max_pixels=64_000_000, render_pixels=4_000_000))
except DocumentError as err:
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the parent pytest's peak.
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(round(time.perf_counter() - started, 3), peak // 1024, err)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2]).stdout  # fmt: skip
    seconds, peak_mb, message = out.split(" ", 2)
    assert "refused as a PDF bomb" in message
    assert int(peak_mb) < 300  # speed is bench/ business (48 ms here); memory says the stream was never kept


def test_document_errors_are_image_errors():
    assert issubclass(DocumentError, ImageError)
