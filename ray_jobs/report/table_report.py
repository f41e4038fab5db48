"""The report of a VLM pass output (a Parquet file or folder of part files): counts over the whole table (errors,
models, moderation categories and verdicts, pages, videos, detect boxes per label) and its first rows, each beside its
image with any boxes drawn over it."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ray_jobs.report.pages import (
    ReportError,
    ReportLayout,
    canonical_uri,
    open_table,
    printable,
    table_report_path_for,
    write_page,
)
from ray_jobs.report.thumbnails import PDF_DPI, Picture, ThumbnailStore

SAMPLE_ROWS = 50
TOP_ERRORS = 10

# The VLM tasks' own output columns (SPEC "VLM pass output"), shown beside each sampled row's image.
TASK_COLUMNS = ("text", "fields", "caption", "safe", "categories", "score", "answer", "boxes", "markdown")
# What a sampled row shows: its id and page, what the model saw, the question it was asked, and what came back.
SAMPLE_COLUMNS = ("id", "page", "image", "image_bytes", "video", "question", "error", "model", "reasoning",
                  *TASK_COLUMNS)  # fmt: skip
BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#008080", "#f032e6", "#9a6324")
NO_LABEL = "(no label)"


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
        return cls(NO_LABEL if label is None else printable(label), *(_coordinate(c) for c in corners))

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



def _format_fields(value: Any) -> Any:
    """An `extract` row's `fields` JSON, indented for reading (as written when it is not valid JSON)."""
    if not isinstance(value, str):
        return value
    try:
        return json.dumps(json.loads(value), indent=2, ensure_ascii=False)
    except ValueError:
        return value



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
    write_page(layout.html, "table_report.html", **context)
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
    values = {k: printable(v) for k, v in row.items() if k not in ("image", "image_bytes", "video", "boxes")}
    if "fields" in values:
        values["fields"] = _format_fields(values["fields"])
    link = thumbs.layout.link(video) if video else None
    return SampleRow(values, picture, boxes, printable(video), link)

