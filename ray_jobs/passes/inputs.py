"""The input of a VLM pass: one Parquet file, a folder or prefix of them, a glob, or Hive-partitioned folders, and
the file-level checks run over all of it before anything starts, streamed so the driver never holds the dataset.
"""

from __future__ import annotations

import posixpath
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from engine import storage
from engine.media.documents import count_pages, is_pdf, render_pages
from engine.media.images import ImageError, decode_image, read_source
from engine.media.video import Video, read_video
from engine.settings import Settings
from ray_jobs.state.manifest import ManifestError

VISUAL_COLUMNS = ("image", "image_bytes", "video")  # exactly one of them per row
TEXT_COLUMNS = ("id", "image", "video", "question", "categories")  # read as text by the pass: bytes that are not
# UTF-8 would stop it midway
_TEXT = (pa.types.is_string, pa.types.is_large_string)
COLUMN_KINDS = {
    "id": _TEXT,
    "image": _TEXT,
    "image_bytes": (pa.types.is_binary, pa.types.is_large_binary),
    "video": _TEXT,
    "question": _TEXT,
    "categories": _TEXT,
}
SCAN_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class ImagesInput:
    """The Parquet files of an images manifest, where they live, and the schema the pass sees (partition
    columns last, as strings: that is how Ray Data's Hive partitioning reads them)."""

    uri: str
    filesystem: fsspec.AbstractFileSystem
    files: tuple[str, ...]
    base_dir: str
    schema: pa.Schema
    partition_columns: tuple[str, ...]
    num_rows: int  # from the files' footers

    def scanner(self, columns: list[str]) -> pds.Scanner:
        """A streaming scan of `columns` over every file (partition columns included)."""
        dataset = pds.dataset(list(self.files), filesystem=self.filesystem, format="parquet",
                              partitioning=_hive(), partition_base_dir=self.base_dir)  # fmt: skip
        # One batch in flight: the checks hold 8 bytes per id, not pyarrow's read-ahead of 16 batches and 4 files.
        return dataset.scanner(columns=columns, batch_size=SCAN_BATCH_ROWS, batch_readahead=1, fragment_readahead=1)

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        try:
            yield from self.scanner(columns).to_batches()
        except (pa.ArrowException, OSError) as err:
            raise ManifestError(f"{self.uri}: not readable ({type(err).__name__}: {err})") from None


def _hive() -> pds.Partitioning:
    return pds.HivePartitioning.discover(infer_dictionary=False)


def _is_data_file(path: str, base: str) -> bool:
    """Parquet files, leaving out what Spark, Hive and Ray leave beside them (`_SUCCESS`, `.crc`, `_temporary/`)."""
    relative = posixpath.relpath(path, base) if path != base else posixpath.basename(path)
    parts = relative.split("/")
    return path.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in parts)


def list_files(uri: str) -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    """(filesystem, Parquet files, base folder) for a file, a folder or prefix (searched recursively) or a glob."""
    try:
        fs, path = storage.filesystem(uri)
    except (ValueError, ImportError) as err:
        raise ManifestError(f"{uri}: cannot open this location ({err})") from None
    path = path.rstrip("/") or "/"
    try:
        if any(c in path for c in "*?["):
            base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            matches = sorted(fs.glob(path))
            files = [f for m in matches for f in (_walk(fs, m, base) if fs.isdir(m) else [m])]
        elif fs.isdir(path):
            base, files = path, _walk(fs, path, path)
        elif fs.isfile(path):
            base, files = posixpath.dirname(path), [path]
        else:
            raise ManifestError(f"{uri}: no such file or folder")
    except OSError as err:
        raise ManifestError(f"{uri}: cannot list ({type(err).__name__}: {err})") from None
    if not files:
        raise ManifestError(f"{uri}: no Parquet files (*.parquet) found")
    return fs, files, base


def _walk(fs: fsspec.AbstractFileSystem, folder: str, base: str) -> list[str]:
    return sorted(f for f in fs.find(folder) if _is_data_file(f, base))


def open_images_input(uri: str) -> ImagesInput:
    """Resolve `uri` to its files and check every file's schema: readable Parquet, the same columns and types in
    each, an `id` and an image column of the right types. Reads only the files' footers."""
    fs, files, base = list_files(uri)
    first: pa.Schema | None = None
    rows = 0
    for path in files:
        try:
            with fs.open(path, "rb") as f:
                metadata = pq.read_metadata(f)
            schema = metadata.schema.to_arrow_schema()
            rows += metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            raise ManifestError(f"{_name(fs, path)}: not a readable Parquet file ({type(err).__name__}: {err})") from None
        if first is None:
            first = schema
        elif not schema.equals(first):
            raise ManifestError(f"{_name(fs, path)}: its columns differ from {_name(fs, files[0])}'s "
                                f"({_describe(schema)} vs {_describe(first)})")  # fmt: skip
    assert first is not None
    partitions = _partition_names(files, base)
    clashes = sorted(set(partitions) & set(first.names))
    if clashes:
        raise ManifestError(f"{uri}: partition folders {clashes} repeat columns of the files")
    if "id" not in first.names:
        raise ManifestError(f"{uri}: no 'id' column")
    if not set(VISUAL_COLUMNS) & set(first.names):
        raise ManifestError(f"{uri}: needs an 'image' (URI), 'image_bytes' or 'video' (URI) column")
    for name, kinds in COLUMN_KINDS.items():
        if name in first.names and not any(k(first.field(name).type) for k in kinds):
            raise ManifestError(f"{uri}: column '{name}' has type {first.field(name).type}")
    schema = pa.schema([*first, *(pa.field(p, pa.string()) for p in partitions)])
    return ImagesInput(uri, fs, tuple(files), base, schema, tuple(partitions), rows)


def _name(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A file's name as the user would write it (s3://bucket/key; a local path as it is)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _partition_names(files: list[str], base: str) -> list[str]:
    """Hive partition keys (`key=value` folders between the base folder and the file), in path order."""
    names: list[str] = []
    for path in files:
        for part in posixpath.relpath(posixpath.dirname(path), base).split("/"):
            key = part.split("=", 1)[0] if "=" in part else None
            if key and key not in names:
                names.append(key)
    return names


# -- the id checks -----------------------------------------------------------------------------------------------


def check_ids(images: ImagesInput) -> None:
    """Every id present and unique across all files, every text column valid UTF-8.

    Streams the columns in batches and keeps one 64-bit hash per id (80 MB for 10 million ids, sorted in place; the
    whole check measured 390 MB and 3 s at 10 million ids, bench/images_input_checks.py); hashes that repeat are then confirmed against the ids themselves, so a hash collision never fails a good
    manifest."""
    columns = [c for c in TEXT_COLUMNS if c in images.schema.names]
    every, filled, nulls = np.empty(images.num_rows, np.uint64), 0, 0
    for batch in images.batches(columns):
        for name in columns:
            try:
                batch.column(name).validate(full=True)
            except pa.ArrowInvalid:
                raise ManifestError(f"{images.uri}: column '{name}' holds text that is not valid UTF-8") from None
        ids = batch.column("id")
        nulls += ids.null_count
        every[filled : filled + len(ids)] = pd.util.hash_array(ids.to_numpy(zero_copy_only=False), categorize=False)
        filled += len(ids)
    if nulls:
        raise ManifestError(f"{images.uri}: {nulls} row(s) have no id")
    every.sort()
    repeated_hashes = np.unique(every[1:][every[1:] == every[:-1]])
    if repeated_hashes.size:
        repeated = _repeated_ids(images, repeated_hashes)
        if repeated:
            raise ManifestError(f"{images.uri}: duplicate ids, e.g. {repeated[:5]}")


def _repeated_ids(images: ImagesInput, candidates: np.ndarray) -> list[str]:
    """The ids that really repeat among those whose hash is in `candidates` (few: a second, exact pass)."""
    seen: set[str] = set()
    repeated: list[str] = []
    for batch in images.batches(["id"]):
        ids = batch.column("id").to_numpy(zero_copy_only=False)
        hits = np.isin(pd.util.hash_array(ids, categorize=False), candidates)
        for value in ids[hits]:
            if value in seen and value not in repeated:
                repeated.append(value)
            seen.add(value)
    return repeated


def check_images_manifest(uri: str) -> ImagesInput:
    """Every file-level check, before anything runs; raises ManifestError with the reason."""
    images = open_images_input(uri)
    check_ids(images)
    return images


# -- rows ---------------------------------------------------------------------------------------------------------


@dataclass
class RowVisual:
    """One thing a row shows the model: its image, one page of its PDF, or its video's sampled frames."""

    visual: Image.Image | Video
    width: int  # upright size in pixels of what is shown (a page at pdf_dpi; a video's frames): boxes are in these
    height: int
    page: int | None = None  # 1-based, for PDF pages


def row_visuals(uri: str | None, data: bytes | None, video: str | None, settings: Settings,
                done_pages: Collection[int] = ()) -> Iterator[RowVisual]:  # fmt: skip
    """What the row shows, in order: one image, a PDF's pages (those not in `done_pages`) or one video. ImageError
    (DocumentError, VideoError) says why the row cannot be used; pages already yielded stay good."""
    given = [name for name, value in zip(VISUAL_COLUMNS, (uri, data, video)) if value is not None]
    if len(given) != 1:
        raise ImageError("the row has none of 'image', 'image_bytes', 'video'; give one" if not given else
                         f"the row has {' and '.join(repr(g) for g in given)}; give exactly one")  # fmt: skip
    limits = {"max_pixels": settings.max_image_pixels, "min_side": settings.min_image_side}
    if video is not None:
        clip = read_video(video, fps=settings.video_fps, max_frames=settings.video_max_frames,
                          max_seconds=settings.video_max_seconds, max_pixels=settings.video_max_pixels,
                          max_frame_pixels=settings.max_image_pixels, min_side=settings.min_image_side)  # fmt: skip
        yield RowVisual(clip, clip.width, clip.height)
        return
    name = "image_bytes" if uri is None else uri
    if data is None:
        data = read_source(uri)
    if is_pdf(data):
        for page in render_pages(data, name=name, dpi=settings.pdf_dpi, max_pages=settings.pdf_max_pages,
                                 max_pixels=settings.max_image_pixels, render_pixels=settings.vlm_max_pixels,
                                 skip=done_pages):  # fmt: skip
            yield RowVisual(page.image, page.width, page.height, page.number)
        return
    image = decode_image(data, name=name, **limits)
    yield RowVisual(image, image.width, image.height)


def check_image_rows(uri: str, settings: Settings) -> Iterator[tuple[int, str, str]]:
    """Every row that a pass would answer with an error, as (row, id, reason): what `validate --kind images` prints.
    PDFs are opened and their pages counted, not rendered; videos are sampled as the pass would. Row numbers count
    across the files in the order they are listed."""
    images = check_images_manifest(uri)
    columns = ["id", *(c for c in VISUAL_COLUMNS if c in images.schema.names)]
    row = 0
    for batch in images.batches(columns):
        for data in batch.to_pylist():
            try:
                _check_row(data.get("image"), data.get("image_bytes"), data.get("video"), settings)
            except ImageError as err:
                yield row, data["id"], str(err)
            row += 1


def _check_row(uri: str | None, data: bytes | None, video: str | None, settings: Settings) -> None:
    if video is None and (uri is None) != (data is None):
        name, blob = uri or "image_bytes", data if data is not None else read_source(uri)
        if is_pdf(blob):
            count_pages(blob, name=name, dpi=settings.pdf_dpi, max_pages=settings.pdf_max_pages,
                        max_pixels=settings.max_image_pixels)  # fmt: skip
        else:
            decode_image(blob, name=name, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
        return
    for _ in row_visuals(uri, data, video, settings):  # raises the row's error
        pass
