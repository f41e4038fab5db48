"""Where a report's files go (ReportLayout: pages, thumbnails, links), the Jinja2 environment that writes its pages,
and what both reports share: reading a Parquet table, model text made printable, ReportError."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jinja2
import pyarrow as pa
import pyarrow.dataset as pds

from engine import storage
from ray_jobs.state.run_dir import RunDirectory

# Reading images and train logs is storage round trips and decoding, not Python work: overlap them.
READ_THREADS = 16
# What a page may link to (a URI from user data could be `javascript:` or the like).
LINKED_SCHEMES = frozenset({"file", "http", "https", "s3", "gs", "gcs", "az", "abfs", "abfss", "memory"})
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ReportError(ValueError):
    """The path is not something a report can be made of; the message says why."""


# -- where the report's files go -------------------------------------------------------------------------------------


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


# -- writing pages and reading tables --------------------------------------------------------------------------------


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("ray_jobs.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def write_page(uri: str, template: str, **context: Any) -> None:
    storage.write_bytes(uri, _environment().get_template(template).render(**context).encode())


def printable(value: Any) -> Any:
    """Model output may hold control characters (a NUL is not allowed in HTML): shown as U+FFFD instead."""
    return CONTROL_CHARACTERS.sub("\ufffd", value) if isinstance(value, str) else value


def open_table(uri: str) -> pds.Dataset:
    """A Parquet file, or a folder of part files (a VLM pass output), as one dataset; ReportError if neither."""
    fs, path = storage.filesystem(uri)
    try:
        return pds.dataset(path, filesystem=fs, format="parquet")
    except FileNotFoundError:
        raise ReportError(f"{uri}: no such file or folder") from None
    except (pa.ArrowException, OSError) as err:
        raise ReportError(f"{uri}: not Parquet ({err})") from None

