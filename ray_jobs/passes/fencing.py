"""Fencing a pass's commits with its driver's lease: a write task commits its part file only while the lease the pass
started under is still the current one, so the workers of a dead driver never commit beside its successor.

Ray Data commits a part by renaming its checkpoint from `<part>.pending.parquet` to `<part>.parquet` (two-phase,
ray.data.checkpoint), through the checkpoint filesystem the pass configures. That filesystem is wrapped here: the
rename first reads the lease, and when it is no longer the pass's (a later epoch, or gone), the task withdraws its part (deletes its
data files and its pending checkpoint) and fails instead of committing. The check and the rename are two requests,
not one: a commit racing the take-over within that gap can still land; the successor's repair (repair.py) removes any
row such a commit doubles.
"""

from __future__ import annotations

import posixpath

import fsspec
import pyarrow.fs as pafs
from pyarrow.fs import FSSpecHandler

from ray_jobs.state.lease import Lease, LeaseLost, read_holder

PENDING_SUFFIX = ".pending.parquet"  # Ray Data's name for a checkpoint not yet committed (checkpoint_writer.py)


class FencedCommits(FSSpecHandler):
    """An fsspec filesystem for Ray Data's checkpoint whose commits check the lease first."""

    def __init__(self, fs: fsspec.AbstractFileSystem, lease_uri: str, epoch: int, token: str, data_dir: str):
        super().__init__(fs)
        self.lease_uri = lease_uri
        self.epoch = epoch
        self.token = token  # the acquisition's own id: an epoch can repeat once a refused command's lease is gone
        self.data_dir = data_dir

    def move(self, src: str, dest: str) -> None:
        if src.endswith(PENDING_SUFFIX):
            holder = read_holder(self.lease_uri)
            if holder is None or holder.token != self.token:
                self.withdraw(src)
                now = "gone" if holder is None else f"epoch {holder.epoch}, held by {holder.describe()}"
                raise LeaseLost(f"a write task of epoch {self.epoch} withdrew {posixpath.basename(src)} instead of "
                                f"committing it: the lease {self.lease_uri} is now {now}")  # fmt: skip
        super().move(src, dest)

    def withdraw(self, pending: str) -> None:
        """Delete the part files this pending checkpoint names, then the checkpoint: nothing of the task is left."""
        prefix = posixpath.basename(pending).removesuffix(PENDING_SUFFIX)
        if self.fs.isdir(self.data_dir):
            for path in self.fs.find(self.data_dir):
                if posixpath.basename(path).startswith(prefix):
                    self.fs.rm(path)
        if self.fs.exists(pending):
            self.fs.rm(pending)

    def __reduce__(self):  # the handler travels to every write task with the pass's checkpoint configuration
        return FencedCommits, (self.fs, self.lease_uri, self.epoch, self.token, self.data_dir)


def fenced_filesystem(fs: fsspec.AbstractFileSystem, lease: Lease, data_dir: str) -> pafs.FileSystem:
    """The pyarrow filesystem of a pass's checkpoint, its commits fenced by the driver's `lease`."""
    assert lease.holder is not None, "fencing needs a lease that is held"
    return pafs.PyFileSystem(FencedCommits(fs, lease.uri, lease.holder.epoch, lease.holder.token, data_dir))
