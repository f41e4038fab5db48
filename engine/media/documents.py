"""PDF pages for the VLM passes: each page rendered upright to RGB at a DPI, every bomb guard checked before rendering.

PDFium (through pypdfium2) is not thread-safe: call these functions from one thread per process. Ray runs each decode
task in a worker process of its own, so a pass never shares PDFium between threads.
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from engine.media.images import ImageError

PDF_MAGIC = b"%PDF-"
MAGIC_WINDOW = 1024  # the PDF spec lets a header start anywhere in the first 1024 bytes (junk before it is allowed)
POINTS_PER_INCH = 72
# One compressed stream may inflate to at most this much. Streams are what PDFium expands: a 1 MB page whose content
# stream inflates to 512 MB costs PDFium ~95 s and ~10 GB to parse (measured), and nothing in PDFium bounds it.
# 64 MiB is a content stream that still costs ~12 s and ~1.3 GB, the worst a page can do here; images pass up to
# 64 MB of raw samples (a 600 dpi A4 greyscale scan is 35 MB; a 600 dpi colour one stored with Flate, 105 MB, does not).
MAX_STREAM_BYTES = 64 * 2**20
MAX_NESTED_FILTERS = 8  # Flate inside Flate inside ...: each layer multiplies, so every layer is inflated and counted
INFLATE_CHUNK = 2**20
_STREAM_START = re.compile(rb"(?<!end)stream(?:\r\n|\n|\r)")


class DocumentError(ImageError):
    """A PDF could not be opened or rendered; the message names its URI and the reason."""


@dataclass
class Page:
    """One rendered page of a PDF."""

    number: int  # 1-based
    image: Image.Image  # RGB, upright, at most render_pixels in area
    width: int  # the page's size in pixels at the requested dpi: what boxes are reported in
    height: int
    points: tuple[float, float]  # the page's upright size in points (1/72 inch), whatever the dpi


def page_pixels(width_pt: float, height_pt: float, dpi: float) -> tuple[int, int]:
    """A page's size in pixels at `dpi`, as the VLM pass reports boxes in it."""
    scale = dpi / POINTS_PER_INCH
    return max(1, round(width_pt * scale)), max(1, round(height_pt * scale))


def is_pdf(data: bytes) -> bool:
    """Whether the bytes are a PDF: the %PDF- header starts within the first 1024 bytes."""
    return data.find(PDF_MAGIC, 0, MAGIC_WINDOW + len(PDF_MAGIC) - 1) != -1


def open_pdf(data: bytes, *, name: str, max_pages: int, max_stream_bytes: int = MAX_STREAM_BYTES) -> pdfium.PdfDocument:
    """Open a PDF, checking everything that needs no rendering: it is a PDF, no stream inflates past
    `max_stream_bytes`, PDFium can open it without a password, and it has 1 to `max_pages` pages.

    The caller closes the document. Raises DocumentError naming `name` and the reason."""
    if not data:
        raise DocumentError(f"{name}: empty file (0 bytes)")
    if not is_pdf(data):
        raise DocumentError(f"{name}: not a PDF (no %PDF- header in its first {MAGIC_WINDOW} bytes; "
                            f"it starts with {data[:12]!r})")  # fmt: skip
    _refuse_inflation_bombs(data, name=name, max_stream_bytes=max_stream_bytes)
    _reset_last_error()
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as err:
        raise DocumentError(f"{name}: {_open_failure(data, err)}") from None
    pages = len(pdf)
    if pages > max_pages:
        pdf.close()
        raise DocumentError(f"{name}: the PDF has {pages} pages, over the limit of {max_pages} (pdf_max_pages)")
    if pages == 0:  # PDFium usually refuses such a file already (see _open_failure)
        pdf.close()
        raise DocumentError(f"{name}: the PDF has no pages")
    return pdf


def count_pages(data: bytes, *, name: str, dpi: float, max_pages: int, max_pixels: int,
                max_stream_bytes: int = MAX_STREAM_BYTES) -> int:  # fmt: skip
    """The number of pages, with every check of render_pages and no rendering (for validating a manifest)."""
    pdf = open_pdf(data, name=name, max_pages=max_pages, max_stream_bytes=max_stream_bytes)
    try:
        return len(_page_sizes(pdf, dpi, max_pixels, name))
    finally:
        pdf.close()


def _page_sizes(pdf: pdfium.PdfDocument, dpi: float, max_pixels: int, name: str) -> list[tuple[float, float]]:
    """Every page's upright size in points; a page over `max_pixels` at `dpi` (a bomb) refuses the document."""
    sizes = [_point_size(pdf, index, name) for index in range(len(pdf))]
    for number, points in enumerate(sizes, 1):
        width, height = page_pixels(*points, dpi)
        if width * height > max_pixels:
            raise DocumentError(
                f"{name}: page {number} is {width}x{height} = {width * height} pixels at {dpi:g} dpi, "
                f"over the limit of {max_pixels} (max_image_pixels)"
            )
    return sizes


def render_pages(
    data: bytes, *, name: str, dpi: float, max_pages: int, max_pixels: int, render_pixels: int,
    skip: Collection[int] = (), max_stream_bytes: int = MAX_STREAM_BYTES,
) -> Iterator[Page]:  # fmt: skip
    """Render each page (in order, skipping the 1-based page numbers in `skip`) upright at `dpi`, scaled down so
    that its bitmap never exceeds `render_pixels` in area: the caller fits pages to the model's pixel budget anyway.

    Every page's size is checked against `max_pixels` (at `dpi`) before any page is rendered, so a bomb anywhere in
    the document fails before work is spent on it. A page that fails to load or render mid-document raises
    DocumentError from the iterator; the pages yielded before it are good (the VLM pass keeps them and adds one
    error row for the rest, so a long PDF is never held whole in memory)."""
    pdf = open_pdf(data, name=name, max_pages=max_pages, max_stream_bytes=max_stream_bytes)
    try:
        scale = dpi / POINTS_PER_INCH
        sizes = _page_sizes(pdf, dpi, max_pixels, name)
        pdf.init_forms()  # so that filled-in form fields are drawn; before any page is loaded, as PDFium requires
        for number, points in enumerate(sizes, 1):
            if number not in skip:
                image = _render(pdf, number, scale, render_pixels, name)
                yield Page(number, image, *page_pixels(*points, dpi), points)
    finally:
        pdf.close()


def _point_size(pdf: pdfium.PdfDocument, index: int, name: str) -> tuple[float, float]:
    """The page's size in points, upright (PDFium applies /Rotate), read from its boxes without loading the page.
    A bitmap rendered from it can be a pixel larger than page_pixels: pypdfium2 rounds its sides up."""
    try:
        width, height = pdf.get_page_size(index)
    except pdfium.PdfiumError as err:
        raise DocumentError(f"{name}: page {index + 1} cannot be read ({err})") from None
    if width <= 0 or height <= 0:
        raise DocumentError(f"{name}: page {index + 1} has no area ({width:g}x{height:g} pt)")
    return width, height


def _render(pdf: pdfium.PdfDocument, number: int, scale: float, render_pixels: int, name: str) -> Image.Image:
    page = bitmap = None
    try:
        page = pdf[number - 1]
        width, height = page.get_size()
        bitmap = page.render(scale=_fit_scale(width, height, scale, render_pixels), rev_byteorder=True)
        return bitmap.to_pil()  # an RGB bitmap is copied into the image, so closing the bitmap is safe
    except Exception as err:  # pypdfium2 raises PdfiumError, ValueError and others for pages it cannot draw
        raise DocumentError(f"{name}: page {number} cannot be rendered ({type(err).__name__}: {err})") from None
    finally:
        for handle in (bitmap, page):
            if handle is not None:
                handle.close()


def _fit_scale(width: float, height: float, scale: float, render_pixels: int) -> float:
    """`scale`, or less so that the bitmap pypdfium2 allocates (each side rounded up) stays within render_pixels."""
    if math.ceil(width * scale) * math.ceil(height * scale) <= render_pixels:
        return scale
    # Rounding up adds less than a pixel per side: solve (w s + 1)(h s + 1) = render_pixels for s.
    area, perimeter = width * height, width + height
    return (math.sqrt(perimeter**2 + 4 * area * (render_pixels - 1)) - perimeter) / (2 * area)


def _reset_last_error() -> None:
    """Set PDFium's last error to "file access error", which loading from memory never sets.

    PDFium keeps its last error across calls and leaves it as it was when it refuses a document without a page tree,
    so a file with no pages read after an encrypted one would be called encrypted. A failed open of a file path is
    the one public way to set it."""
    pdfium_c.FPDF_LoadDocument(b"\0", None)


_PDFIUM_ERRORS = {
    pdfium_c.FPDF_ERR_UNKNOWN: "unknown error",
    pdfium_c.FPDF_ERR_FORMAT: "data format error",
    pdfium_c.FPDF_ERR_PAGE: "page not found or content error",
}


def _open_failure(data: bytes, err: pdfium.PdfiumError) -> str:
    reason = f"PDFium: {_PDFIUM_ERRORS.get(err.err_code, f'error {err.err_code}')}"
    if err.err_code == pdfium_c.FPDF_ERR_PASSWORD:
        return "the PDF is encrypted and needs a password"
    if err.err_code == pdfium_c.FPDF_ERR_SECURITY:
        return "the PDF is encrypted with a security handler PDFium does not support"
    if err.err_code == pdfium_c.FPDF_ERR_FILE:  # left as _reset_last_error set it: no page tree, or an empty one
        return "the PDF has no pages"
    if b"%%EOF" not in data[-MAGIC_WINDOW:]:
        return f"cannot open the PDF: it is truncated or damaged beyond repair (no %%EOF at its end; {reason})"
    return f"cannot open the PDF ({reason})"


def _refuse_inflation_bombs(data: bytes, *, name: str, max_stream_bytes: int) -> None:
    """Inflate every Flate stream in the file (in 1 MiB pieces, nothing kept) and refuse the file when one would
    expand past max_stream_bytes, before PDFium inflates any of them whole.

    Streams are found by their `stream` keyword rather than by parsing the file, so a stream that PDFium reads is
    never missed; one that does not start with a zlib header (another filter, or encrypted) is not inflated."""
    view = memoryview(data)
    for match in _STREAM_START.finditer(data):
        raw = (view[at : at + INFLATE_CHUNK] for at in range(match.end(), len(data), INFLATE_CHUNK))
        try:
            _drain(raw, max_stream_bytes, depth=1)
        except zlib.error:
            continue  # not a zlib stream, or corrupt: PDFium stops inflating where zlib does
        except _InflatesTooFar as err:
            raise DocumentError(
                f"{name}: refused as a PDF bomb: the stream at byte {match.start()} inflates to more than "
                f"{max_stream_bytes} bytes{' (Flate inside Flate)' if err.depth > 1 else ''}"
            ) from None


class _InflatesTooFar(Exception):
    def __init__(self, depth: int):
        self.depth = depth


def _drain(chunks: Iterable[bytes], limit: int, depth: int) -> None:
    """Inflate `chunks` to the end, and again each layer whose output is itself zlib data."""
    inflated = _inflate(chunks, limit, depth)
    first = next(inflated, b"")
    if depth < MAX_NESTED_FILTERS and _is_zlib(first):
        try:
            _drain(itertools.chain([first], inflated), limit, depth + 1)
        except zlib.error:
            pass  # the layer only looked like zlib: finish inflating the outer one
    for _ in inflated:
        pass


def _inflate(chunks: Iterable[bytes], limit: int, depth: int) -> Iterator[bytes]:
    inflater = zlib.decompressobj()
    total = 0
    for chunk in chunks:
        while chunk:
            out = inflater.decompress(chunk, INFLATE_CHUNK)
            total += len(out)
            if total > limit:
                raise _InflatesTooFar(depth)
            if out:
                yield out
            if inflater.eof:
                return
            chunk = inflater.unconsumed_tail


def _is_zlib(head: bytes) -> bool:
    """A zlib header: deflate method, and a check value that makes the first two bytes a multiple of 31."""
    return len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
