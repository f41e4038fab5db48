"""Reading and writing run files through fsspec, so a local directory and `s3://` behave the same.

Writes are all-or-nothing: a reader sees the old file or the new one, never a torn one. On a local disk that is
write-to-temporary-then-rename; object stores publish a single PUT atomically. Transient storage errors (a
dropped connection, a throttled request) are retried with exponential backoff; a missing file is not transient.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

RETRIES = 5
BACKOFF_SECONDS = 0.05
T = TypeVar("T")


def retried(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry `fn` on transient errors: 5 tries, backoff 0.05 s doubling, with jitter so workers don't stampede."""

    @functools.wraps(fn)
    def call(*args, **kwargs) -> T:
        for attempt in range(RETRIES):
            try:
                return fn(*args, **kwargs)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
                raise
            except OSError:  # s3fs, gcsfs and aiohttp raise OSError subclasses for transient faults
                if attempt == RETRIES - 1:
                    raise
                time.sleep(BACKOFF_SECONDS * 2**attempt * (1 + random.random()))
        raise AssertionError("unreachable")

    return call


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(_decoded_file_uri(uri))
    return fs, path


def _decoded_file_uri(uri: str) -> str:
    """A `file://` URI as a path fsspec opens. URIs are percent-encoded (`Path.as_uri()` writes `a%20b.png` for
    `a b.png`, and escapes every non-ASCII byte), but fsspec takes the text after `file://` literally. A name that
    really holds `%20` still opens when only its literal spelling exists."""
    if not uri.startswith("file://") or "::" in uri:
        return uri
    rest = uri.removeprefix("file://")
    rest = rest.removeprefix("localhost")  # file://localhost/a is file:///a (RFC 8089)
    if "%" not in rest:
        return "file://" + rest
    decoded = urllib.parse.unquote(rest)
    if not os.path.exists(decoded) and os.path.exists(rest):
        return "file://" + rest
    return "file://" + decoded


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


@retried
def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:  # a failed write (disk full, say) leaves nothing behind; only a killed process can
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)


def write_json(uri: str, value: Any) -> None:
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True, default=str).encode())


def write_parquet(uri: str, table) -> None:
    """A pyarrow Table as one Parquet file at `uri`, written atomically like any other file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


@retried
def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


@retried
def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


@retried
def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under `uri`; empty when it does not exist."""
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


@retried
def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@retried
def put_file(local_path: Path, uri: str) -> None:
    """Publish a local file at `uri` atomically, without reading it into memory."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.put_file(str(local_path), path)  # a single (multipart) upload, visible only once complete


def copy_file(source: str, target: str) -> None:
    """Copy one file to `target` atomically (a reader sees the old file or the copy): a local copy renamed into
    place, a server-side copy within one object store, else a read and a write."""
    source_fs, source_path = filesystem(source)
    target_fs, target_path = filesystem(target)
    if isinstance(source_fs, LocalFileSystem) and isinstance(target_fs, LocalFileSystem):
        put_file(Path(source_path), target)
    elif source_fs is target_fs:
        retried(target_fs.copy)(source_path, target_path)
    else:
        write_bytes(target, read_bytes(source))


@retried
def find(uri: str) -> list[str]:
    """Paths of every file under `uri` (recursively), relative to it; empty when it does not exist."""
    fs, path = filesystem(uri)
    root = path.rstrip("/")
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    return sorted(f[len(root) + 1 :] for f in found if f.startswith(root + "/"))


def upload_dir(local_dir: Path, uri: str) -> None:
    """Copy a local directory's files to `uri`, each file written atomically."""
    for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        write_bytes(join(uri, file.relative_to(local_dir).as_posix()), file.read_bytes())
