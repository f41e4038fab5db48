"""`dreamfleet report`: a static HTML report of a run directory or of a VLM pass output, read from its files alone.

Pages are plain HTML and CSS (Jinja2 templates in ray_jobs/templates/, autoescaped; no JavaScript: what a script
would sort, page 1 lists already sorted, the evaluated subjects worst first). Every image is shown as a small JPEG
thumbnail made once under `<report>_files/thumbs/` and linked to the full-size image; links inside the report's
folder are relative, so the folder can be copied or served as it is.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import io
import json
import math
import re
import statistics
import sys
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import jinja2
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from PIL import Image

from engine import storage
from engine.media.documents import count_pages, is_pdf, page_pixels, render_pages
from engine.media.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image
from engine.media.video import read_first_frame
from engine.settings import Settings
from ray_jobs import exit_status
from ray_jobs.state.manifest import subjects_of_run
from ray_jobs.state.run_dir import NotARunError, RunDirectory, SubjectStatus, summarize
from ray_jobs.state.states import FAILED, RUNNING_STATES, STAGE_OF_STATE

THUMBNAIL_SIZE = 192  # longest side, px
THUMBNAIL_QUALITY = 85
# Reading images and train logs is storage round trips and decoding, not Python work: overlap them.
READ_THREADS = 16
SUBJECTS_PER_PAGE = 200  # a page of a 1,000-subject run still opens at once; images load lazily
SAMPLE_ROWS = 50
TOP_ERRORS = 10
LOSS_WIDTH, LOSS_HEIGHT, LOSS_MAX_POINTS = 320, 96, 400
# The VLM tasks' own output columns (SPEC "VLM pass output"), shown beside each sampled row's image.
TASK_COLUMNS = ("text", "fields", "caption", "safe", "categories", "score", "answer", "boxes", "markdown")
# What a sampled row shows: its id and page, what the model saw, the question it was asked, and what came back.
SAMPLE_COLUMNS = ("id", "page", "image", "image_bytes", "video", "question", "error", "model", "reasoning",
                  *TASK_COLUMNS)  # fmt: skip
BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#008080", "#f032e6", "#9a6324")
NO_LABEL = "(no label)"
PDF_DPI = Settings.model_fields["pdf_dpi"].default  # the pass's default; boxes on pages are in pixels at its dpi
PDF_MAX_PAGES = Settings.model_fields["pdf_max_pages"].default
PDFIUM = threading.Lock()  # PDFium is not thread-safe: one document open at a time in this process
# Transposes that turn a decoded video frame upright, by the counter-clockwise degrees of its display matrix.
LINKED_SCHEMES = frozenset({"file", "http", "https", "s3", "gs", "gcs", "az", "abfs", "abfss", "memory"})
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A subject's mean under these is flagged whatever the rest of the run scored: every method in the DreamBooth paper's
# Table 1 scores above them (textual inversion, the lowest, has DINO 0.569 and CLIP-T 0.255). They hold for the
# paper's models only (other models, the tiny random ones above all, score on other scales): (metric, model) → floor.
FLOORS = {("dino", "facebook/dino-vits16"): 0.5, ("clip_t", "openai/clip-vit-large-patch14"): 0.2}
QUARTILE_MIN_SUBJECTS = 4  # fewer evaluated subjects have no meaningful bottom quarter
WORST_LISTED = SUBJECTS_PER_PAGE  # rows of page 1's worst-first table; every card carries its own flag


class ReportError(ValueError):
    """The path is not something a report can be made of; the message says why."""


# -- where the report's files go ---------------------------------------------------------------------------------


def canonical_uri(uri: str) -> str:
    """One spelling per location (`/a/b`, `file:///a/b` and a relative path all become `file:///abs/a/b`)."""
    try:
        fs, path = storage.filesystem(uri)
    except (ValueError, ImportError):  # a protocol fsspec does not know, or whose package is not installed
        return uri
    return fs.unstrip_protocol(path.rstrip("/"))


def report_path_for(run_uri: str) -> str:
    """Where `dreamfleet report RUN` writes by default: RUN/report.html."""
    return RunDirectory(run_uri).report


def table_report_path_for(parquet_uri: str) -> str:
    """Where `dreamfleet report OUTPUT.parquet` writes by default: OUTPUT.report.html, next to it."""
    return f"{parquet_uri.removesuffix('.parquet')}.report.html"


@dataclass(frozen=True)
class ReportLayout:
    """The report's pages (page 1 at `html`, then `<stem>-2.html`, ...) and its thumbnails folder beside them."""

    html: str  # canonical URI of page 1

    @property
    def folder(self) -> str:
        return self.html.rsplit("/", 1)[0]

    @property
    def stem(self) -> str:
        return self.html.rsplit("/", 1)[1].removesuffix(".html")

    @property
    def thumbs(self) -> str:
        return storage.join(self.folder, f"{self.stem}_files", "thumbs")

    def thumb_link(self, name: str) -> str:
        return quote(f"{self.stem}_files/thumbs/{name}")

    def page_name(self, number: int) -> str:
        return self.html.rsplit("/", 1)[1] if number == 1 else f"{self.stem}-{number}.html"

    def link(self, uri: str) -> str | None:
        """A link from a page to `uri`: relative inside the report's folder, else the absolute URI of a storage
        scheme (never `javascript:` or the like: URIs come from user data)."""
        target = canonical_uri(uri)
        if target.startswith(self.folder + "/"):
            return quote(target[len(self.folder) + 1 :])
        return target if target.split("://", 1)[0].lower() in LINKED_SCHEMES else None


# -- thumbnails ---------------------------------------------------------------------------------------------------


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


# -- rendering ----------------------------------------------------------------------------------------------------


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("ray_jobs.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _write_page(uri: str, template: str, **context: Any) -> None:
    storage.write_bytes(uri, _environment().get_template(template).render(**context).encode())


# -- the run report -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A generated image's moderation result (a row of RUN/moderation.parquet)."""

    safe: bool | None
    categories: list[str]
    score: float | None
    error: str | None

    @property
    def css(self) -> str:
        return "error" if self.error else "safe" if self.safe else "flagged"


def _score(value: Any) -> float | None:
    """A score as read from a file: a finite number, else None (shown as a dash, never as the file's text)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class ImageScores:
    """A generated image's evaluation (a row of RUN/evaluation.parquet); scores are None when the row failed."""

    dino: float | None
    clip_i: float | None
    clip_t: float | None
    error: str | None
    class_prompt: bool  # generated from the subject's class prompt: its DINO is a PRES sample (lower is better)
    dino_floor: float | None = None  # FLOORS of the models that scored it
    clip_t_floor: float | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> ImageScores:
        dino, clip_i, clip_t = (_score(row.get(k)) for k in ("dino", "clip_i", "clip_t"))
        return cls(dino, clip_i, clip_t, _printable(row.get("error")), row.get("class_prompt") is True,
                   FLOORS.get(("dino", row.get("dino_model"))), FLOORS.get(("clip_t", row.get("clip_model"))))

    @property
    def low(self) -> set[str]:
        """The scores under their floors (a class-prompt image's DINO is not: there, low is good)."""
        def under(value: float | None, floor: float | None) -> bool:
            return value is not None and floor is not None and value < floor

        low = {"dino"} if under(self.dino, self.dino_floor) and not self.class_prompt else set()
        return low | ({"clip_t"} if under(self.clip_t, self.clip_t_floor) else set())


@dataclass(frozen=True)
class SubjectScores:
    """A subject's evaluation means, from its status.json's `evaluation` (over its images not from the class
    prompt; `pres` is the mean DINO of those that are)."""

    images: int  # scored, class-prompt ones included
    errors: int  # not scored
    dino: float | None
    clip_i: float | None
    clip_t: float | None
    pres: float | None
    class_images: int
    dino_model: str | None
    clip_model: str | None
    evaluated_at: str | None

    @classmethod
    def of(cls, value: Any) -> SubjectScores | None:
        if not isinstance(value, dict):
            return None
        count = {k: value.get(k) if isinstance(value.get(k), int) else 0 for k in ("images", "errors", "class_images")}
        text = {k: _printable(str(value[k])) if value.get(k) is not None else None
                for k in ("dino_model", "clip_model", "evaluated_at")}  # fmt: skip
        return cls(**count, **text, **{k: _score(value.get(k)) for k in ("dino", "clip_i", "clip_t", "pres")})


@dataclass(frozen=True)
class ScoreBar:
    """Where a subject's mean of one metric is flagged: under an absolute floor, or under the run's first quartile
    (from QUARTILE_MIN_SUBJECTS evaluated subjects up; the lowest quarter of the run, whatever its level)."""

    metric: str  # the SubjectScores field
    label: str
    floor: float | None  # None unless every subject was scored by the model FLOORS has a floor for
    quartile: float | None
    subjects: int  # evaluated subjects with this mean

    @classmethod
    def of_run(cls, metric: str, label: str, scores: list[SubjectScores]) -> ScoreBar:
        values = sorted(v for v in (getattr(s, metric) for s in scores) if v is not None)
        enough = len(values) >= QUARTILE_MIN_SUBJECTS
        models = {s.dino_model if metric == "dino" else s.clip_model for s in scores}
        floor = FLOORS.get((metric, models.pop())) if len(models) == 1 else None
        return cls(metric, label, floor, statistics.quantiles(values, n=4, method="inclusive")[0] if enough else None,
                   len(values))  # fmt: skip

    def reasons(self, scores: SubjectScores) -> list[str]:
        value = getattr(scores, self.metric)
        if value is None:
            return []
        reasons = [f"{self.label} {value:.3f} under {self.floor:.2f}"] if self.floor is not None and value < self.floor else []
        if self.quartile is not None and value < self.quartile:
            reasons.append(f"{self.label} {value:.3f} in the run's lowest quarter (under {self.quartile:.3f})")
        return reasons


def score_flags(scores: SubjectScores, bars: list[ScoreBar]) -> list[str]:
    """Why a subject's scores flag it (nothing when they do not): a low mean, or not one image scored."""
    if not scores.images and scores.errors:
        return ["no image could be scored"]
    return [reason for bar in bars for reason in bar.reasons(scores)]


@dataclass
class GeneratedImage:
    id: str | None
    seed: int | None
    picture: Picture
    verdict: Verdict | None  # None: not moderated
    scores: ImageScores | None = None  # None: not evaluated


@dataclass
class PromptGroup:
    prompt_index: int
    prompt: str
    images: list[GeneratedImage] = field(default_factory=list)

    @property
    def class_prompt(self) -> bool:
        return any(i.scores is not None and i.scores.class_prompt for i in self.images)


@dataclass(frozen=True)
class LossCurve:
    """A train log's loss as an SVG polyline in a LOSS_WIDTH x LOSS_HEIGHT box (higher loss drawn higher)."""

    points: str
    first_step: int
    last_step: int
    low: float
    high: float
    final: float
    width: int = LOSS_WIDTH
    height: int = LOSS_HEIGHT


STAGE_NAMES = {"train": "training", "generate": "generation"}
MATES_SHOWN = 6  # pack mates named in a history row; the rest are counted


@dataclass(frozen=True)
class PackStay:
    """The pack a training attempt ran in: its id and every subject that trained in it alongside at some step (mates
    come and go as slots are refilled, so there can be more of them than the pack has slots)."""

    id: str
    mates: list[str]

    @property
    def shown(self) -> list[str]:
        return self.mates[:MATES_SHOWN]

    @property
    def more(self) -> int:
        return len(self.mates) - len(self.shown)


@dataclass(frozen=True)
class Attempt:
    """A row of a subject's history table: a recorded attempt, or one status.json counts without an outcome."""

    number: int | None
    stage: str
    outcome: str  # "ok", "failed", "interrupted", or "running or interrupted"
    entry: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def facts(self) -> list[str]:
        """What the attempt did, as short phrases (steps, images, seconds)."""
        if self.outcome not in ("ok", "failed"):
            return ["no outcome recorded"]
        e, facts = self.entry, []
        if e.get("steps_run") is not None:
            resumed = f" (resumed from step {e['resumed_from']})" if e.get("resumed_from") else ""
            facts.append(f"{e['steps_run']} steps{resumed}")
        if e.get("images_generated") is not None:
            facts.append(f"{e['images_generated']} image{'s' if e['images_generated'] != 1 else ''}")
        if isinstance(e.get("seconds"), int | float):
            facts.append(f"{e['seconds']:.1f} s")
        return facts

    @property
    def pack(self) -> PackStay | None:
        if not self.entry.get("pack"):
            return None
        return PackStay(str(self.entry["pack"]), [str(m) for m in self.entry.get("pack_mates") or []])


@dataclass(frozen=True)
class AttemptSummary:
    """A subject's attempts counted per stage: retries are attempts after a failed (or interrupted) attempt of the
    same stage, so a subject trained and rendered first time has none, whatever status.attempts says."""

    rows: list[Attempt]
    retries: int
    failed_stage: str | None  # the stage a failed subject failed in; None if it failed before any attempt
    failed_after: int  # its attempts at that stage since the stage last succeeded

    @property
    def retries_text(self) -> str:
        return f"{self.retries} retr{'y' if self.retries == 1 else 'ies'}" if self.retries else ""

    @property
    def failed_after_text(self) -> str:
        if not self.failed_after:
            return ""
        stage = STAGE_NAMES.get(self.failed_stage or "", self.failed_stage)
        words = (str(self.failed_after), stage, "attempts" if self.failed_after != 1 else "attempt")
        return " ".join(w for w in words if w)


def attempt_summary(status: SubjectStatus) -> AttemptSummary:
    """The rows of `status`'s history, with the attempts it counts but holds no outcome of, and its retries."""
    rows: list[Attempt] = []
    expected = 1  # the scheduler numbers a subject's attempts 1, 2, ... across its stages
    for entry in status.history or []:
        number, stage = entry.get("attempt"), str(entry.get("stage") or "")
        if isinstance(number, int):
            rows += [Attempt(n, stage, "interrupted", {}) for n in range(expected, number)]
            expected = max(expected, number + 1)
        rows.append(Attempt(number, stage, "ok" if entry.get("ok") else "failed", entry))
    if status.state in STAGE_OF_STATE:
        for n in range(expected, status.attempts + 1):
            running = n == status.attempts and status.state in RUNNING_STATES
            outcome = "running or interrupted" if running else "interrupted"
            rows.append(Attempt(n, STAGE_OF_STATE[status.state], outcome, {}))
    retries, last_ok = 0, {}
    for row in rows:
        if last_ok.get(row.stage) is False:  # an attempt after its stage's previous one failed
            retries += 1
        last_ok[row.stage] = row.ok
    failed_stage, failed_after = None, 0
    if status.state == FAILED and rows:
        failed_stage = rows[-1].stage
        for row in reversed([r for r in rows if r.stage == failed_stage]):
            if row.ok:
                break
            failed_after += 1
    return AttemptSummary(rows, retries, failed_stage, failed_after)


@dataclass
class SubjectCard:
    status: SubjectStatus
    page: int
    instance_images: list[Picture]
    prompts: list[PromptGroup]
    loss: LossCurve | None
    scores: SubjectScores | None = None  # None: not evaluated
    flags: list[str] = field(default_factory=list)  # why its scores put it among the worst

    @functools.cached_property
    def attempts(self) -> AttemptSummary:
        return attempt_summary(self.status)


def loss_curve(records: list[dict[str, Any]]) -> LossCurve | None:
    """The curve of a train log's finite losses, thinned to at most LOSS_MAX_POINTS points; None if nothing to draw."""
    steps = [(int(r["step"]), float(r["loss"])) for r in records if "loss" in r and math.isfinite(float(r["loss"]))]
    if not steps:
        return None
    stride = math.ceil(len(steps) / LOSS_MAX_POINTS)
    shown = steps[::stride] if steps[-1] in steps[::stride] else [*steps[::stride], steps[-1]]
    first, last = steps[0][0], steps[-1][0]
    low, high = min(loss for _, loss in steps), max(loss for _, loss in steps)
    pad = 4

    def xy(step: int, loss: float) -> str:
        x = pad + (LOSS_WIDTH - 2 * pad) * ((step - first) / (last - first) if last > first else 0.5)
        y = pad + (LOSS_HEIGHT - 2 * pad) * ((high - loss) / (high - low) if high > low else 0.5)
        return f"{x:.1f},{y:.1f}"

    return LossCurve(" ".join(xy(s, loss) for s, loss in shown), first, last, low, high, steps[-1][1])


def _read_loss_curve(run_uri: str, subject_id: str) -> LossCurve | None:
    uri = RunDirectory(run_uri).train_log(subject_id)
    try:
        text = storage.read_bytes(uri).decode()
    except FileNotFoundError:
        return None
    try:
        return loss_curve([json.loads(line) for line in text.splitlines() if line.strip()])
    except (ValueError, KeyError, TypeError):  # a log from another version: no curve rather than no report
        return None


def _instance_images(record: dict[str, Any], notes: list[str]) -> dict[str, tuple[str, ...]]:
    """Each subject's instance image URIs, from the manifest(s) the run was started with, as far as still readable."""
    subjects, problems = subjects_of_run(record)
    notes.extend(problems)
    return {sid: s.instance_images for sid, s in subjects.items()}


def _read_optional_table(uri: str, wanted: list[str], notes: list[str]) -> list[dict[str, Any]]:
    """The `wanted` columns (those present) of a run's table (a file or a folder of part files), as rows; none when
    it is absent or unreadable."""
    if not storage.exists(uri):
        return []
    try:
        table = open_table(uri)
        return table.to_table(columns=[c for c in wanted if c in table.schema.names]).to_pylist()
    except (ReportError, pa.ArrowException, OSError) as err:
        notes.append(f"{uri}: unreadable, left out ({type(err).__name__}: {err})")
        return []


def _verdicts(run_uri: str, notes: list[str]) -> dict[str, Verdict]:
    rows = _read_optional_table(
        RunDirectory(run_uri).moderation, ["id", "safe", "categories", "score", "error"], notes
    )
    return {
        r["id"]: Verdict(r.get("safe"), list(r.get("categories") or []), r.get("score"), r.get("error"))
        for r in rows
        if r.get("id") is not None
    }


def _image_scores(run_uri: str, notes: list[str]) -> dict[str, ImageScores]:
    rows = _read_optional_table(
        RunDirectory(run_uri).evaluation,
        ["id", "dino", "clip_i", "clip_t", "error", "class_prompt", "dino_model", "clip_model"],
        notes,
    )
    return {r["id"]: ImageScores.of(r) for r in rows if r.get("id") is not None}


def _prompt_groups(
    rows: list[dict[str, Any]], verdicts: dict[str, Verdict], scores: dict[str, ImageScores], thumbs: ThumbnailStore
) -> list[PromptGroup]:
    groups: dict[tuple[int, str], PromptGroup] = {}
    for row in sorted(rows, key=lambda r: (r.get("prompt_index") or 0, r.get("image_index") or 0)):
        key = (row.get("prompt_index") or 0, row.get("prompt") or "")
        group = groups.setdefault(key, PromptGroup(*key))
        row_id = row.get("id")
        picture = thumbs.for_uri(row["image"])
        group.images.append(GeneratedImage(row_id, row.get("seed"), picture, verdicts.get(row_id), scores.get(row_id)))
    return list(groups.values())


def _flag_low_scores(cards: list[SubjectCard]) -> list[ScoreBar]:
    """Flag each evaluated card whose DINO or CLIP-T is low (ScoreBar); the bars, for the page to state."""
    evaluated = [c.scores for c in cards if c.scores is not None]
    bars = [ScoreBar.of_run("dino", "DINO", evaluated), ScoreBar.of_run("clip_t", "CLIP-T", evaluated)]
    for card in cards:
        card.flags = score_flags(card.scores, bars) if card.scores is not None else []
    return bars


def worst_first(cards: list[SubjectCard]) -> list[SubjectCard]:
    """The evaluated cards, flagged ones first, each part by DINO lowest first (those without a DINO first of all)."""
    evaluated = [c for c in cards if c.scores is not None]
    return sorted(evaluated, key=lambda c: (not c.flags, c.scores.dino is not None, c.scores.dino or 0.0))


def _wall_time(record: dict[str, Any]) -> str | None:
    if not (record.get("started_at") and record.get("ended_at")):
        return None
    try:
        started, ended = (datetime.datetime.fromisoformat(record[k]) for k in ("started_at", "ended_at"))
    except ValueError:
        return None
    return str(datetime.timedelta(seconds=round((ended - started).total_seconds())))


def write_run_report(run_uri: str, out: str | None = None) -> str:
    """Write the report of the run directory `run_uri` (default RUN/report.html, more pages beside it); its URI."""
    run = RunDirectory(run_uri)
    record = run.require_run()
    layout = ReportLayout(canonical_uri(out or report_path_for(run.uri)))
    notes: list[str] = []
    statuses = sorted(run.read_statuses().values(), key=lambda s: s.subject_id)
    instance = _instance_images(record, notes)
    verdicts = _verdicts(run.uri, notes)
    image_scores = _image_scores(run.uri, notes)
    generations = defaultdict(list)
    wanted = ["id", "subject_id", "prompt", "prompt_index", "image_index", "seed", "image"]
    for row in _read_optional_table(run.generations, wanted, notes):
        generations[row["subject_id"]].append(row)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        curves = list(pool.map(lambda s: _read_loss_curve(run.uri, s.subject_id), statuses))
    thumbs = ThumbnailStore(layout, record["settings"].get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
    cards = [
        SubjectCard(
            status=status,
            page=1 + index // SUBJECTS_PER_PAGE,
            instance_images=[thumbs.for_uri(uri) for uri in instance.get(status.subject_id, ())],
            prompts=_prompt_groups(generations.get(status.subject_id, []), verdicts, image_scores, thumbs),
            loss=curve,
            scores=SubjectScores.of(status.evaluation),
        )
        for index, (status, curve) in enumerate(zip(statuses, curves))
    ]
    thumbs.make_pending()
    _write_run_pages(layout, run, record, cards, notes)
    return out or report_path_for(run.uri)


def _write_run_pages(
    layout: ReportLayout,
    run: RunDirectory,
    record: dict[str, Any],
    cards: list[SubjectCard],
    notes: list[str],
) -> None:
    pages = max(1, math.ceil(len(cards) / SUBJECTS_PER_PAGE))
    bars = _flag_low_scores(cards)
    ranked = worst_first(cards)
    statuses = {c.status.subject_id: c.status for c in cards}
    images = [i for c in cards for g in c.prompts for i in g.images]
    summary = {
        "counts": summarize(statuses),
        "subjects": len(cards),
        "images": len(images),
        "moderated": sum(i.verdict is not None for i in images),
        "flagged": sum(i.verdict is not None and i.verdict.css == "flagged" for i in images),
        "moderation_errors": sum(i.verdict is not None and i.verdict.css == "error" for i in images),
        "evaluated": len(ranked),
        "low_scores": sum(bool(c.flags) for c in ranked),
    }
    context = {
        "run_uri": run.uri,
        "record": record,
        "wall_time": _wall_time(record),
        "summary": summary,
        "failed": [c for c in cards if c.status.state == FAILED],
        "rejected": run.read_rejected_rows(),
        "notes": notes,
        "bars": bars,
        "quartile_min": QUARTILE_MIN_SUBJECTS,
        "worst": ranked[:WORST_LISTED],
        "eval_models": sorted({(c.scores.dino_model, c.scores.clip_model) for c in ranked}, key=str),
        "pages": [layout.page_name(n) for n in range(1, pages + 1)],
        # where each subject's card is, for the pack mates named in the history tables
        "card_links": {c.status.subject_id: f"{layout.page_name(c.page)}#subject-{c.status.subject_id}" for c in cards},
    }
    for number in range(1, pages + 1):
        page_cards = cards[(number - 1) * SUBJECTS_PER_PAGE : number * SUBJECTS_PER_PAGE]
        _write_page(storage.join(layout.folder, layout.page_name(number)), "run_report.html",
                    page=number, first=(number - 1) * SUBJECTS_PER_PAGE + 1, cards=page_cards, **context)  # fmt: skip
    _remove_stale_pages(layout, pages)


def _remove_stale_pages(layout: ReportLayout, pages: int) -> None:
    """Pages past the last one, left by an earlier report of more subjects, would link to nothing; remove them."""
    for name in storage.listdir(layout.folder):
        number = name.removeprefix(f"{layout.stem}-").removesuffix(".html")
        if name == f"{layout.stem}-{number}.html" and number.isdigit() and int(number) > pages:
            storage.remove(storage.join(layout.folder, name))


# -- the table report ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A `detect` box in pixels of the upright original, top-left origin (SPEC "VLM pass output")."""

    label: str
    x1: float | None
    y1: float | None
    x2: float | None
    y2: float | None

    @classmethod
    def of(cls, value: dict[str, Any] | None) -> Box:
        value = value or {}
        corners = (value.get(k) for k in ("x1", "y1", "x2", "y2"))
        label = value.get("label")
        return cls(NO_LABEL if label is None else _printable(label), *(_coordinate(c) for c in corners))

    @property
    def drawable(self) -> bool:
        return all(c is not None and math.isfinite(c) for c in (self.x1, self.y1, self.x2, self.y2))

    # The rectangle as SVG draws it (corners in either order), to a hundredth of a pixel.
    @property
    def x(self) -> float:
        return round(min(self.x1, self.x2), 2)

    @property
    def y(self) -> float:
        return round(min(self.y1, self.y2), 2)

    @property
    def width(self) -> float:
        return round(abs(self.x2 - self.x1), 2)

    @property
    def height(self) -> float:
        return round(abs(self.y2 - self.y1), 2)

    @property
    def colour(self) -> str:
        """The same colour for a label in every row and every report."""
        return BOX_COLOURS[int(hashlib.sha256(self.label.encode()).hexdigest()[:8], 16) % len(BOX_COLOURS)]

    @property
    def corners(self) -> list[str]:
        return ["–" if c is None else f"{c:.1f}" for c in (self.x1, self.y1, self.x2, self.y2)]

    @property
    def title(self) -> str:
        x1, y1, x2, y2 = self.corners
        return f"{self.label} ({x1}, {y1})–({x2}, {y2})"


def _coordinate(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class BoxOverlay:
    """A row's boxes drawn over its thumbnail: an SVG whose viewBox is the upright original's size in pixels, so each
    box lands where its coordinates say however much the thumbnail is scaled."""

    width: int
    height: int
    boxes: list[Box]

    @property
    def font_size(self) -> float:
        return round(max(self.width, self.height) / 16, 2)  # about 12 px on a thumbnail, whatever the image's size


@dataclass
class SampleRow:
    values: dict[str, Any]  # the row's id, page, error, model and task columns
    picture: Picture | None
    boxes: list[Box] | None = None  # a `detect` row's boxes; None if the row has none (another task, or an error)
    video: str | None = None  # the row's video URI, as text
    video_link: str | None = None

    @property
    def overlay(self) -> BoxOverlay | None:
        if not self.boxes or self.video is not None or self.picture is None or self.picture.size is None:
            return None
        return BoxOverlay(*self.picture.size, [b for b in self.boxes if b.drawable])

    @property
    def undrawn(self) -> str | None:
        """Why the row's boxes are listed but not drawn."""
        if not self.boxes or self.overlay is not None:
            return None
        if self.video is not None:
            return "boxes on a video are listed, not drawn"
        return "no thumbnail to draw the boxes on"

    @property
    def box_counts(self) -> list[tuple[str, int]]:
        return sorted(Counter(b.label for b in self.boxes or []).items(), key=lambda item: (-item[1], item[0]))


def _printable(value: Any) -> Any:
    """Model output may hold control characters (a NUL is not allowed in HTML): shown as U+FFFD instead."""
    return CONTROL_CHARACTERS.sub("\ufffd", value) if isinstance(value, str) else value


def _format_fields(value: Any) -> Any:
    """An `extract` row's `fields` JSON, indented for reading (as written when it is not valid JSON)."""
    if not isinstance(value, str):
        return value
    try:
        return json.dumps(json.loads(value), indent=2, ensure_ascii=False)
    except ValueError:
        return value


def open_table(uri: str) -> pds.Dataset:
    """A Parquet file, or a folder of part files (a VLM pass output), as one dataset; ReportError if neither."""
    fs, path = storage.filesystem(uri)
    try:
        return pds.dataset(path, filesystem=fs, format="parquet")
    except FileNotFoundError:
        raise ReportError(f"{uri}: no such file or folder") from None
    except (pa.ArrowException, OSError) as err:
        raise ReportError(f"{uri}: not Parquet ({err})") from None


def _list_type(schema: pa.Schema, name: str) -> pa.DataType | None:
    """The item type of column `name` when it is a list; None when it is absent or not a list."""
    if name not in schema.names:
        return None
    kind = schema.field(name).type
    return kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else None


def holds_moderation_codes(schema: pa.Schema) -> bool:
    """Whether `categories` is moderation's list of codes; `detect` passes its input's text column through instead."""
    return _list_type(schema, "categories") is not None


def holds_boxes(schema: pa.Schema) -> bool:
    """Whether `boxes` is detect's list of labelled boxes, not some input column of the same name passed through."""
    item = _list_type(schema, "boxes")
    return item is not None and pa.types.is_struct(item) and item.get_field_index("label") >= 0


@dataclass
class TableStats:
    """What the report says of a whole table, counted batch by batch so a table of millions of rows fits."""

    rows: int = 0
    errors: Counter = field(default_factory=Counter)
    models: set = field(default_factory=set)
    categories: Counter = field(default_factory=Counter)
    verdicts: Counter = field(default_factory=Counter)
    pages: int = 0  # rows that are a page of a PDF
    videos: int = 0
    detections: int = 0  # rows with a list of boxes (empty when nothing was found)
    boxes: Counter = field(default_factory=Counter)  # label -> boxes
    box_rows: Counter = field(default_factory=Counter)  # label -> rows with at least one box of it

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        names = batch.schema.names
        if "error" in names:
            self.errors.update(e for e in batch.column("error").to_pylist() if e is not None)
        if "model" in names:
            self.models.update(m for m in batch.column("model").to_pylist() if m)
        if holds_moderation_codes(batch.schema):
            self.categories.update(code for codes in batch.column("categories").to_pylist() for code in codes or [])
        if "safe" in names:
            self.verdicts.update(batch.column("safe").to_pylist())
        if "page" in names:
            self.pages += batch.num_rows - batch.column("page").null_count
        if "video" in names:
            self.videos += batch.num_rows - batch.column("video").null_count
        if holds_boxes(batch.schema):
            self._add_boxes(batch.column("boxes"))

    def _add_boxes(self, boxes: pa.Array) -> None:
        self.detections += len(boxes) - boxes.null_count
        flat = pc.list_flatten(boxes)
        if len(flat) == 0:
            return
        labels = pc.fill_null(pc.struct_field(flat, "label"), NO_LABEL)
        found = pa.table({"label": labels, "row": pc.list_parent_indices(boxes)})
        per_label = found.group_by("label").aggregate([("row", "count"), ("row", "count_distinct")]).to_pylist()
        for counted in per_label:
            self.boxes[counted["label"]] += counted["row_count"]
            self.box_rows[counted["label"]] += counted["row_count_distinct"]


def write_table_report(parquet_uri: str, out: str | None = None, pdf_dpi: float = PDF_DPI) -> str:
    """Write the report of a VLM pass output (default OUTPUT.report.html, next to it); returns its URI. `pdf_dpi`: the
    pass's, the resolution of the pages its boxes are in pixels of."""
    table = open_table(parquet_uri)
    columns = table.schema.names
    stats = TableStats()
    detect = holds_boxes(table.schema)
    counted = ["error", "safe", "model", "page", "video", *(["boxes"] if detect else []),
               *(["categories"] if holds_moderation_codes(table.schema) else [])]  # fmt: skip
    try:
        for batch in table.to_batches(columns=[c for c in counted if c in columns]):
            stats.add(batch)
        shown = [c for c in SAMPLE_COLUMNS if c in columns]
        first = table.head(SAMPLE_ROWS, columns=shown).to_pylist() if shown else []
    except (pa.ArrowException, OSError) as err:
        raise ReportError(f"{parquet_uri}: not readable ({err})") from None
    layout = ReportLayout(canonical_uri(out or table_report_path_for(parquet_uri)))
    thumbs = ThumbnailStore(layout, pdf_dpi=pdf_dpi)
    sample = [_sample_row(row, thumbs, detect) for row in first]
    thumbs.make_pending()
    context = {
        "source": parquet_uri,
        "source_link": layout.link(parquet_uri),
        "rows": stats.rows,
        "errors": sum(stats.errors.values()),
        "top_errors": stats.errors.most_common(TOP_ERRORS),
        "distinct_errors": len(stats.errors),
        "models": sorted(stats.models),
        "has_categories": holds_moderation_codes(table.schema),
        "categories": sorted(stats.categories.items(), key=lambda item: (-item[1], item[0])),
        "verdicts": stats.verdicts if "safe" in columns else None,
        "pages": stats.pages if "page" in columns else None,
        "videos": stats.videos if "video" in columns else None,
        "detections": stats.detections if detect else None,
        "total_boxes": sum(stats.boxes.values()),
        "box_labels": [(label, n, stats.box_rows[label])
                       for label, n in sorted(stats.boxes.items(), key=lambda item: (-item[1], item[0]))],  # fmt: skip
        "pdf_dpi": f"{pdf_dpi:g}",
        "columns": [c for c in TASK_COLUMNS if c in columns],
        "sample": sample,
    }
    _write_page(layout.html, "table_report.html", **context)
    return out or table_report_path_for(parquet_uri)


def _sample_row(row: dict[str, Any], thumbs: ThumbnailStore, detect: bool) -> SampleRow:
    boxes = [Box.of(b) for b in row["boxes"]] if detect and row.get("boxes") is not None else None
    page, sized = row.get("page"), bool(boxes)
    picture = video = None
    if row.get("image"):
        picture = thumbs.for_uri(row["image"], page, sized)
    elif row.get("image_bytes"):
        picture = thumbs.for_bytes(row["image_bytes"], f"row {row.get('id')!r} image_bytes", page, sized)
    elif row.get("video"):
        video = row["video"]
        picture = thumbs.for_video(video)
    values = {k: _printable(v) for k, v in row.items() if k not in ("image", "image_bytes", "video", "boxes")}
    if "fields" in values:
        values["fields"] = _format_fields(values["fields"])
    link = thumbs.layout.link(video) if video else None
    return SampleRow(values, picture, boxes, _printable(video), link)


# -- the command --------------------------------------------------------------------------------------------------


def write_report(uri: str, out: str | None = None, pdf_dpi: float = PDF_DPI) -> str:
    """The report of whatever `uri` is: a run directory (it has run.json), a pass output (a folder of Parquet part
    files) or a Parquet file; its URI. `pdf_dpi`: a pass output's (see write_table_report)."""
    if storage.exists(RunDirectory(uri).run_json):
        return write_run_report(uri, out)
    fs, path = storage.filesystem(uri)
    try:
        if fs.isdir(path):
            if not any(f.endswith(".parquet") for f in fs.find(path)):
                raise ReportError(f"{uri}: a directory with neither run.json nor Parquet part files")
            return write_table_report(uri, out, pdf_dpi)
        with fs.open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ReportError(f"{uri}: no such file or directory") from None
    except OSError as err:
        raise ReportError(f"{uri}: cannot read ({type(err).__name__}: {err})") from None
    if magic != b"PAR1":
        raise ReportError(f"{uri}: neither a run directory (no run.json) nor a Parquet file")
    return write_table_report(uri, out, pdf_dpi)


def cmd_report(args: argparse.Namespace) -> int:
    try:
        print(write_report(args.path, args.out, args.pdf_dpi))
    except (ReportError, NotARunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_status.NOT_RUN
    return exit_status.OK


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `dreamfleet report RUN|OUTPUT.parquet [--out FILE]` on the CLI's subcommands."""
    report = commands.add_parser("report", help="an HTML report of a run directory or a VLM pass output")
    report.add_argument("path", help="run directory, VLM pass output folder, or Parquet file (any fsspec URI)")
    report.add_argument("--out", help="the report's HTML file (default: RUN/report.html, OUTPUT.report.html)")
    report.add_argument("--pdf-dpi", type=_dpi, default=PDF_DPI,
                        help=f"the pass's pdf_dpi, which its boxes on PDF pages are in pixels of (default {PDF_DPI:g})")
    report.set_defaults(handler=cmd_report)


def _dpi(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive resolution")
    return value
