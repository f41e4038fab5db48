"""Repairing a pass output that holds a row twice or a part nobody committed: what two drivers writing one OUT at
once (before leases) or a dead driver's workers can leave. One row per id (and PDF page) is kept, the committed one.

A part file is committed when a committed checkpoint of Ray Data's (`OUT.checkpoint/<part>.parquet`) names it: its
data files are `OUT/<part>-<k>.parquet`. A part with only a pending checkpoint is a write in flight or a killed one;
a part with no checkpoint at all is debris (a withdrawn or killed orphan's). After a pass has finished, both are
debris. Rows repeated across committed parts keep the copy in the first part by name; the others are rewritten out
of their data file and their checkpoint, each file replaced atomically.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from engine import storage
from ray_jobs.passes.fencing import PENDING_SUFFIX


@dataclass
class Repair:
    """What a repair removed from OUT."""

    debris_files: list[str] = field(default_factory=list)
    debris_rows: int = 0
    duplicate_rows: int = 0
    duplicate_examples: list[str] = field(default_factory=list)  # up to 5 of the repeated ids

    def describe(self, uri: str) -> list[str]:
        """One line for each kind of repair made, for the command to print; empty when OUT was sound."""
        lines = []
        if self.duplicate_rows:
            lines.append(f"{uri} held {self.duplicate_rows} row(s) twice (ids {', '.join(self.duplicate_examples)}"
                         f"{', ...' if len(self.duplicate_examples) == 5 else ''}): kept one "
                         "committed row of each, removed the others")  # fmt: skip
        if self.debris_files:
            lines.append(f"{uri}: removed {len(self.debris_files)} part file(s) ({self.debris_rows} rows) that no "
                         "checkpoint commits, left by a killed or fenced write")  # fmt: skip
        return lines


def repair_output(fs: fsspec.AbstractFileSystem, data_dir: str, checkpoint_dir: str, finished: bool) -> Repair:
    """Remove from the pass output at `data_dir` its uncommitted parts and the second copies of its rows.

    `finished`: the pass has ended, so a part still pending is debris too; before a pass starts, pending parts are
    left to Ray Data, which deletes them as it loads the checkpoint."""
    repair = Repair()
    fs.invalidate_cache()  # listings cached by s3fs predate what the pass's workers wrote
    if not fs.isdir(data_dir) or not fs.isdir(checkpoint_dir):
        return repair  # no checkpoint at all: nothing tells a committed part from another; leave OUT as it is
    checkpoints = fs.ls(checkpoint_dir, detail=False)
    pending = {posixpath.basename(f).removesuffix(PENDING_SUFFIX): f for f in checkpoints if f.endswith(PENDING_SUFFIX)}
    committed = {posixpath.basename(f).removesuffix(".parquet"): f for f in checkpoints
                 if f.endswith(".parquet") and not f.endswith(PENDING_SUFFIX)}  # fmt: skip
    parts: dict[str, list[str]] = {}  # committed part -> its data files
    for path in sorted(f for f in fs.find(data_dir) if f.endswith(".parquet")):
        name = posixpath.basename(path)
        part = next((p for p in committed if _names(p, name)), None)
        if part is not None:
            parts.setdefault(part, []).append(path)
        elif finished or not any(_names(p, name) for p in pending):
            repair.debris_rows += _footer(fs, path).num_rows
            repair.debris_files.append(path)
            fs.rm(path)
    if finished:
        for path in pending.values():
            fs.rm(path)
    _drop_second_copies(fs, parts, committed, repair)
    return repair


def _names(part: str, file_name: str) -> bool:
    """Whether `file_name` is a data file of `part` (Ray Data names them `<part>-<k>.parquet`)."""
    return file_name.startswith(part) and file_name[len(part) : len(part) + 1] in ("-", ".")


def _drop_second_copies(fs: fsspec.AbstractFileSystem, parts: dict[str, list[str]], committed: dict[str, str],
                        repair: Repair) -> None:  # fmt: skip
    files = [path for part in sorted(parts) for path in parts[part]]
    keys = [_keys(fs, path) for path in files]
    if not keys:
        return
    every = pa.concat_tables(keys)
    if every.group_by(["id", "page"]).aggregate([]).num_rows == every.num_rows:
        return  # the usual case, decided in Arrow without a Python loop
    seen: set[tuple] = set()
    rewritten: set[str] = set()
    for part in sorted(parts):
        for path in parts[part]:
            table = keys[files.index(path)]
            rows = list(zip(table.column("id").to_pylist(), table.column("page").to_pylist()))
            keep = [row not in seen for row in rows]
            seen.update(rows)
            if all(keep):
                continue
            dropped = [row[0] for row, k in zip(rows, keep) if not k]
            repair.duplicate_rows += len(dropped)
            repair.duplicate_examples = sorted({*repair.duplicate_examples, *map(repr, dropped)})[:5]
            kept = _read(fs, path).filter(pa.array(keep))
            if kept.num_rows:
                storage.write_parquet(_uri(fs, path), kept)
            else:
                fs.rm(path)
            rewritten.add(part)
    for part in rewritten:  # each checkpoint again lists exactly the ids its data files hold
        remaining = [path for path in parts[part] if fs.exists(path)]
        if not remaining:
            fs.rm(committed[part])
            continue
        id_type = _read(fs, committed[part]).schema.field("id").type
        ids = pa.concat_tables([_read(fs, path, ["id"]) for path in remaining]).column("id")
        storage.write_parquet(_uri(fs, committed[part]), pa.table({"id": pc.cast(ids, id_type)}))


def _keys(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    """A part's (id, page): a PDF's id is one row per page; page is null for every other row."""
    names = _footer(fs, path).schema.to_arrow_schema().names
    table = _read(fs, path, ["id", "page"] if "page" in names else ["id"])
    page = table.column("page") if "page" in names else pa.nulls(table.num_rows, pa.int32())
    return pa.table({"id": pc.cast(table.column("id"), pa.string()), "page": pc.cast(page, pa.int32())})


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _read(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _footer(fs: fsspec.AbstractFileSystem, path: str) -> pq.FileMetaData:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata
