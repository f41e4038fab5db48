"""Thumbnails: a small upright JPEG of each image, PDF page or video's first frame a report shows, made once beside
the report (named by a hash of the source) and reused by every later report; each records its source's upright size."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from engine import storage
from engine.media.documents import count_pages, is_pdf, page_pixels, render_pages
from engine.media.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image
from engine.media.video import read_first_frame
from engine.settings import Settings
from ray_jobs.report.pages import READ_THREADS, ReportLayout, canonical_uri

THUMBNAIL_SIZE = 192  # longest side, px
THUMBNAIL_QUALITY = 85
PDF_DPI = Settings.model_fields["pdf_dpi"].default  # the pass's default; boxes on pages are in pixels at its dpi
PDF_MAX_PAGES = Settings.model_fields["pdf_max_pages"].default
PDFIUM = threading.Lock()  # PDFium is not thread-safe: one document open at a time in this process


@dataclass(frozen=True)
class UprightSize:
    """The upright size of what a thumbnail shows, as recorded in the thumbnail's JPEG comment: pixels of an image
    (EXIF orientation applied), or points of a PDF page, which a report turns into pixels at the pass's pdf_dpi."""

    width: float
    height: float
    unit: str  # "px" or "pt"

    def pixels(self, dpi: float) -> tuple[int, int]:
        if self.unit == "px":
            return int(self.width), int(self.height)
        return page_pixels(self.width, self.height, dpi)

    def comment(self) -> bytes:
        return json.dumps({"upright": [self.width, self.height], "unit": self.unit}).encode()

    @classmethod
    def from_comment(cls, comment: bytes | None) -> UprightSize | None:
        try:
            recorded = json.loads(comment or b"")
            (width, height), unit = recorded["upright"], recorded["unit"]
            return cls(float(width), float(height), unit) if unit in ("px", "pt") else None
        except (ValueError, KeyError, TypeError):  # no comment, or a thumbnail made before sizes were recorded
            return None



@dataclass
class Picture:
    """An image as a page shows it: its thumbnail (None when it could not be made, with the reason) and full size."""

    name: str  # the thumbnail's file name
    full: str | None  # link to the full-size image; None for bytes in a table, or a URI not safe to link
    thumb: str | None = None
    problem: str | None = None
    size: tuple[int, int] | None = None  # upright pixels (a PDF page at pdf_dpi), when the thumbnail records them


@dataclass
class ThumbnailJob:
    """How to make one thumbnail, and the pictures that show it; `exists` when only its recorded size is wanted."""

    make: Callable[[], tuple[Image.Image, UprightSize]]
    exists: bool
    pictures: list[Picture] = field(default_factory=list)


class ThumbnailStore:
    """Thumbnails named by a hash of their source (URI or bytes, and the PDF page), made once and reused by every
    later report. Each records the upright size of its source, so boxes can be drawn over a reused one.

    A thumbnail already in the folder is never remade, so an image replaced at the same URI keeps its old
    thumbnail until the folder's thumbnails are deleted; run directories never rewrite an image in place.
    """

    def __init__(self, layout: ReportLayout, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 pdf_dpi: float = PDF_DPI, pdf_max_pages: int = PDF_MAX_PAGES):  # fmt: skip
        self.layout = layout
        self.max_pixels = max_pixels
        self.pdf_dpi = pdf_dpi
        self.pdf_max_pages = pdf_max_pages
        self.existing = set(storage.listdir(layout.thumbs))
        self.pending: dict[str, ThumbnailJob] = {}

    def for_uri(self, uri: str, page: int | None = None, sized: bool = False) -> Picture:
        """The thumbnail of the image (or PDF page) at `uri`; `sized`: its upright size is needed too."""
        canonical = canonical_uri(uri)
        name = _thumbnail_name(canonical.encode(), page)
        make = functools.partial(self._still, lambda: storage.read_bytes(canonical), uri, page)
        return self._register(Picture(name, self.layout.link(uri)), make, sized)

    def for_bytes(self, data: bytes, label: str, page: int | None = None, sized: bool = False) -> Picture:
        make = functools.partial(self._still, lambda: data, label, page)
        return self._register(Picture(_thumbnail_name(data, page), None), make, sized)

    def for_video(self, uri: str) -> Picture:
        """The thumbnail of a video's first frame."""
        canonical = canonical_uri(uri)
        name = _thumbnail_name(f"video:{canonical}".encode(), None)
        return self._register(Picture(name, self.layout.link(uri)), lambda: self._first_frame(canonical, uri), False)

    def _register(self, picture: Picture, make: Callable[[], tuple[Image.Image, UprightSize]], sized: bool) -> Picture:
        picture.thumb = self.layout.thumb_link(picture.name)
        exists = picture.name in self.existing
        if not exists or sized:
            self.pending.setdefault(picture.name, ThumbnailJob(make, exists)).pictures.append(picture)
        return picture

    def make_pending(self) -> None:
        """Make every registered thumbnail not in the folder yet, and read the size of those wanted with theirs; the
        pictures of an unreadable image get why."""
        jobs = list(self.pending.items())
        with ThreadPoolExecutor(READ_THREADS) as pool:
            results = list(pool.map(lambda job: self._run(*job), jobs))
        for (name, job), (size, problem) in zip(jobs, results):
            if problem is None:
                self.existing.add(name)
            for picture in job.pictures:
                if problem is None:
                    picture.size = size.pixels(self.pdf_dpi) if size else None
                else:
                    picture.thumb, picture.problem = None, problem
        self.pending.clear()

    def _run(self, name: str, job: ThumbnailJob) -> tuple[UprightSize | None, str | None]:
        """Thumbnail `name`'s upright size once it is in the folder (made now if need be), or why it cannot be."""
        uri = storage.join(self.layout.thumbs, name)
        if job.exists:
            try:
                recorded = UprightSize.from_comment(Image.open(io.BytesIO(storage.read_bytes(uri))).info.get("comment"))
            except Exception:  # deleted since listed, or not a JPEG any more: made again below
                recorded = None
            if recorded is not None:
                return recorded, None
        try:
            image, size = job.make()
        except ImageError as err:
            return None, str(err)
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, comment=size.comment())
        storage.write_bytes(uri, buffer.getvalue())
        return size, None

    def _still(self, source: Callable[[], bytes], label: str, page: int | None) -> tuple[Image.Image, UprightSize]:
        """An image, upright, or a PDF's page (page 1 of a row without one) rendered about thumbnail size."""
        data = _read(source, label)
        if is_pdf(data):
            return self._page(data, label, page or 1)
        image = decode_image(data, name=label, max_pixels=self.max_pixels, min_side=1)
        return image, UprightSize(image.width, image.height, "px")

    def _page(self, data: bytes, label: str, number: int) -> tuple[Image.Image, UprightSize]:
        """Page `number` of a PDF, through the pass's own renderer and guards, drawn at about thumbnail size."""
        others = set(range(1, self.pdf_max_pages + 1)) - {number}
        with PDFIUM:
            pages = list(render_pages(data, name=label, dpi=self.pdf_dpi, max_pages=self.pdf_max_pages,
                                      max_pixels=self.max_pixels, render_pixels=THUMBNAIL_SIZE**2, skip=others))
            if not pages:
                count = count_pages(data, name=label, dpi=self.pdf_dpi, max_pages=self.pdf_max_pages,
                                    max_pixels=self.max_pixels)  # fmt: skip
                raise ImageError(f"{label}: the PDF has {count} page{'s' if count != 1 else ''}, no page {number}")
        return pages[0].image, UprightSize(*pages[0].points, "pt")

    def _first_frame(self, canonical: str, label: str) -> tuple[Image.Image, UprightSize]:
        """A video's first frame, upright (engine.media.video applies the display matrix, mirrors too)."""
        image = Image.fromarray(read_first_frame(canonical, max_frame_pixels=self.max_pixels))
        return image, UprightSize(image.width, image.height, "px")


def _thumbnail_name(source: bytes, page: int | None) -> str:
    digest = hashlib.sha256(source)
    if page is not None:
        digest.update(f"#page={page}".encode())
    return digest.hexdigest()[:24] + ".jpg"


def _read(source: Callable[[], bytes], label: str) -> bytes:
    try:
        return source()
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except Exception as err:  # each fsspec backend raises its own types (credentials, permissions, network)
        raise ImageError(f"{label}: cannot read ({type(err).__name__}: {err})") from None

