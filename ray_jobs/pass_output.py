"""The output of a VLM pass: OUT, a folder of Parquet part files written by Ray Data's write tasks, and beside it
OUT.checkpoint, Ray Data's record of the ids already written.

Exactly once comes from Ray Data's checkpointing (ray.data.checkpoint, Ray 2.60): each write task first records
its ids as a *pending* checkpoint named after its data files, then writes the files, then renames the checkpoint to
committed. A rerun first deletes the data files of every pending checkpoint (a task killed between its write and
its commit), then skips every committed id. The checkpoint lives beside OUT, not in it: Ray's clean-up deletes files
under OUT by name prefix, and readers of OUT (pandas, polars, duckdb) should see nothing but part files. It is kept
after success, so a rerun with new rows answers only those.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from engine import storage
from ray_jobs.manifest import ManifestError

FOOTER_READ_THREADS = 16  # reading footers is storage round trips: overlap them


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
        if not committed or pending or self.committed_rows() < images.num_rows:
            return False
        written = pds.dataset(committed, filesystem=self.fs, format="parquet").to_table(columns=["id"]).column("id")
        written = written.combine_chunks()
        return all(pc.all(pc.is_in(batch.column("id"), value_set=written)).as_py() is not False
                   for batch in images.batches(["id"]))  # fmt: skip

    def checkpoint_config(self):
        from ray.data.checkpoint import CheckpointConfig

        return CheckpointConfig(
            id_column="id",
            checkpoint_path=self.checkpoint_path,
            delete_checkpoint_on_success=False,
            override_filesystem=self.arrow_filesystem(),
        )

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

