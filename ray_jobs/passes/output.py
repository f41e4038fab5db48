"""The output of a VLM pass: OUT, a folder of Parquet part files written by Ray Data's write tasks, and beside it
OUT.checkpoint, Ray Data's record of the ids already written.

Exactly once comes from Ray Data's checkpointing (ray.data.checkpoint, Ray 2.60): each write task first records
its ids as a *pending* checkpoint named after its data files, then writes the files, then renames the checkpoint to
committed. A rerun first deletes the data files of every pending checkpoint (a task killed between its write and
its commit), then skips every committed id. The checkpoint lives beside OUT, not in it: Ray's clean-up deletes files
under OUT by name prefix, and readers of OUT (pandas, polars, duckdb) should see nothing but part files. It is kept
after success, so a rerun with new rows answers only those.

A PDF is one input row but a row per page in OUT, and its pages may land in different part files, committed apart.
Ray's filter would drop the whole PDF once any page is written; `PageCheckpointManager` and `PageAwareFilter` make
resume exact per (id, page): ids with a row whose `page` is null (an image, a video, a failed row) are done, and a
PDF with pages written goes on with `__done_pages`, so only its missing pages are rendered and answered.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from ray.data.checkpoint.checkpoint_filter import (
    CheckpointFilter,
    IdColumnCheckpointManager,
)

from engine import storage
from ray_jobs.state.manifest import ManifestError

FOOTER_READ_THREADS = 16  # reading footers is storage round trips: overlap them
DONE_PAGES = "__done_pages"  # the pages of a PDF row already in OUT, added to resumed input rows


def written_pages(ids: np.ndarray, data_dir: str, filesystem: pafs.FileSystem) -> tuple[np.ndarray, dict[str, list[int]]]:
    """From the committed ids (sorted, a PDF's id once per page) and OUT's part files: (the sorted ids that are done
    whole, {id: pages written} of PDFs with no row of page null)."""
    dataset = pds.dataset(data_dir, filesystem=filesystem, format="parquet")
    if "page" not in dataset.schema.names:
        return np.unique(ids), {}
    pages = dataset.to_table(columns=["id", "page"], filter=pc.field("page").is_valid())
    paged = pages.group_by("id").aggregate([("page", "list")])
    page_lists = dict(zip(paged.column("id").to_pylist(), (sorted(p) for p in paged.column("page_list").to_pylist())))
    whole_ids = dataset.to_table(columns=["id"], filter=pc.field("page").is_null()).column("id")
    whole = np.unique(whole_ids.to_numpy(zero_copy_only=False)) if len(whole_ids) else np.array([], dtype=object)
    for done in whole:
        page_lists.pop(done, None)
    return whole, page_lists


class PageCheckpointManager(IdColumnCheckpointManager):
    """Ray's loading of the committed ids (pending writes cleaned first), then split into whole rows and PDF pages."""

    def load_checkpoint(self, data_file_dir=None, data_file_filesystem=None):
        import ray

        ids_ref, size = super().load_checkpoint(data_file_dir, data_file_filesystem)
        if ids_ref is None or data_file_dir is None:
            return ids_ref, size
        task = ray.remote(num_cpus=1)(written_pages)
        # Whole ids and the page lists together weigh at most twice the ids: reserve that for each filter actor.
        return task.remote(ids_ref, data_file_dir, data_file_filesystem or self.filesystem), 2 * size


class PageAwareFilter(CheckpointFilter):
    """Drops rows that are done whole; lets a PDF with pages written through with the list of those pages."""

    def __init__(self, config, checkpoint_ref):
        import ray

        super().__init__(config, checkpoint_ref)
        self.whole, self.pages = ray.get(checkpoint_ref)

    def filter_rows_for_block(self, block: pa.Table) -> pa.Table:
        if len(self.whole):
            ids = block.column(self.id_column).to_numpy(zero_copy_only=False)
            where = np.searchsorted(self.whole, ids).clip(max=len(self.whole) - 1)
            block = block.filter(pa.array(self.whole[where] != ids))
        done = [self.pages.get(i) for i in block.column(self.id_column).to_pylist()]
        return block.append_column(DONE_PAGES, pa.array(done, pa.list_(pa.int32())))


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The pyarrow filesystem Ray Data and its checkpointing use: the native one for a local disk, the same fsspec
    filesystem (with the same credentials and endpoint) wrapped for anything else."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


class PassOutput:
    """OUT and OUT.checkpoint, on any fsspec filesystem a whole cluster can see."""

    def __init__(self, uri: str):
        if uri.startswith("memory://"):
            raise ManifestError(f"{uri}: memory:// is private to one process; Ray's workers cannot write it")
        self.uri = uri.rstrip("/")
        self.fs, path = storage.filesystem(self.uri)
        self.path = self.fs._strip_protocol(path).rstrip("/")  # what Ray's pyarrow filesystem calls it
        self.checkpoint_path = f"{self.path}.checkpoint"

    def arrow_filesystem(self) -> pafs.FileSystem:
        return arrow_filesystem(self.fs)

    def prepare(self) -> None:
        """Refuse what is not a pass output; forget a checkpoint whose output is gone (else nothing would be redone)."""
        if self.fs.isfile(self.path):
            raise ManifestError(
                f"{self.uri}: a single Parquet file, as dreamfleet wrote before passes wrote folders of part files; "
                "move it away or choose another --out"
            )
        if self.fs.exists(self.checkpoint_path) and not self.data_files():
            self.fs.rm(self.checkpoint_path, recursive=True)

    def _checkpoint_files(self) -> tuple[list[str], list[str]]:
        """(committed, pending) files of Ray Data's checkpoint."""
        if not self.fs.isdir(self.checkpoint_path):
            return [], []
        files = [f for f in self.fs.ls(self.checkpoint_path, detail=False) if f.endswith(".parquet")]
        pending = [f for f in files if f.endswith(".pending.parquet")]
        return [f for f in files if f not in pending], pending

    def resuming(self) -> bool:
        """Whether Ray Data will restore from a checkpoint (and so run its checkpoint filter actor)."""
        return any(self._checkpoint_files())

    def holds_every_id(self, images) -> bool:
        """Whether every id of `images` is committed already, so the pass has nothing to do. Exact (pyarrow's is_in
        over the committed ids); tried only when no write was left pending and as many ids are committed as exist."""
        committed, pending = self._checkpoint_files()
        if not committed or pending or self.committed_rows() < images.num_rows or self.has_pages():
            return False
        written = pds.dataset(committed, filesystem=self.fs, format="parquet").to_table(columns=["id"]).column("id")
        written = written.combine_chunks()
        return all(pc.all(pc.is_in(batch.column("id"), value_set=written)).as_py() is not False
                   for batch in images.batches(["id"]))  # fmt: skip

    def has_pages(self) -> bool:
        """Whether OUT holds PDF pages, whose ids alone cannot tell a finished PDF from one half written."""
        def paged(path: str) -> bool:
            metadata = self._footer(path)
            column = metadata.schema.to_arrow_schema().get_field_index("page")
            if column < 0:
                return False
            for i in range(metadata.num_row_groups):
                stats = metadata.row_group(i).column(column).statistics
                if stats is None or not stats.has_null_count or stats.null_count < metadata.row_group(i).num_rows:
                    return True
            return False

        with ThreadPoolExecutor(FOOTER_READ_THREADS) as pool:
            return any(pool.map(paged, self.data_files()))

    def checkpoint_config(self):
        from ray.data.checkpoint import CheckpointConfig

        return CheckpointConfig(
            id_column="id",
            checkpoint_path=self.checkpoint_path,
            delete_checkpoint_on_success=False,
            override_filesystem=self.arrow_filesystem(),
            checkpoint_manager_cls=PageCheckpointManager,
            checkpoint_filter_cls=PageAwareFilter,
        )

    @contextmanager
    def checkpointed(self, verbose: bool) -> Iterator[None]:
        """Ray Data's context for a pass into OUT: its checkpoint on for the pass, off again after it. dreamfleet shows
        its own bar; Ray Data's per-operator bars only with --verbose, on a terminal."""
        import ray

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = verbose and sys.stdout.isatty()
        context.checkpoint_config = self.checkpoint_config()
        try:
            yield
        finally:
            context.checkpoint_config = None

    def write(self, ds, rows_per_file: int) -> None:
        """Run the pass `ds` into OUT. Each file (`rows_per_file` rows, the last fewer) is one write task and one
        checkpoint commit: the most a killed driver loses, beside the batches in flight."""
        ds.write_parquet(self.path, filesystem=self.arrow_filesystem(), min_rows_per_file=rows_per_file,
                         max_rows_per_file=rows_per_file)  # fmt: skip

    def committed_rows(self) -> int:
        """Ids Ray Data's checkpoint records as written (its committed files' footers)."""
        with ThreadPoolExecutor(FOOTER_READ_THREADS) as pool:
            return sum(pool.map(lambda f: self._footer(f).num_rows, self._checkpoint_files()[0]))

    def _footer(self, path: str) -> pq.FileMetaData:
        with self.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata

    def data_files(self) -> list[str]:
        if not self.fs.isdir(self.path):
            return []
        return sorted(f for f in self.fs.find(self.path) if f.endswith(".parquet"))

    def summary(self) -> tuple[int, int]:
        """(rows, rows with an error), from the part files' footers alone."""

        def count(path: str) -> tuple[int, int]:
            metadata = self._footer(path)
            column = metadata.schema.to_arrow_schema().get_field_index("error")
            errors = 0
            for i in range(metadata.num_row_groups):
                group = metadata.row_group(i)
                stats = group.column(column).statistics
                if stats is None or not stats.has_null_count:  # no statistics: count the column itself
                    with self.fs.open(path, "rb") as f:
                        table = pq.read_table(f, columns=["error"])
                    return table.num_rows, table.num_rows - table.column("error").null_count
                errors += group.num_rows - stats.null_count
            return metadata.num_rows, errors

        with ThreadPoolExecutor(FOOTER_READ_THREADS) as pool:
            counts = list(pool.map(count, self.data_files()))
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

