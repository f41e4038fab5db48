"""A write task commits its part only while the lease its pass started under is current: after a take-over, an
orphan's commit withdraws its part instead (local disk and S3 through moto's server)."""

from __future__ import annotations

import pickle
import uuid

import pyarrow as pa
import pytest

from engine import storage
from ray_jobs.passes.fencing import fenced_filesystem
from ray_jobs.state.lease import Lease, LeaseLost, output_lease_uri


@pytest.fixture(params=["local", "s3"])
def out_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out.parquet")
    request.getfixturevalue("s3_endpoint")
    bucket = f"fence-{uuid.uuid4().hex[:12]}"
    storage.filesystem(f"s3://{bucket}")[0].mkdir(bucket)
    return f"s3://{bucket}/out.parquet"


def _write_part(out: str, name: str) -> None:
    """What a write task does before its commit: its pending checkpoint, then its data file."""
    storage.write_parquet(f"{out}.checkpoint/{name}.pending.parquet", pa.table({"id": ["a"]}))
    storage.write_parquet(f"{out}/{name}-0.parquet", pa.table({"id": ["a"], "error": pa.nulls(1, pa.string())}))


def test_an_orphan_of_an_older_epoch_withdraws_its_part(out_uri):
    fs, path = storage.filesystem(out_uri)
    lease = Lease(output_lease_uri(out_uri), "dreamfleet analyze in.parquet").acquire()
    checkpoint_fs = pickle.loads(pickle.dumps(fenced_filesystem(fs, lease, path)))  # as a task gets it
    _write_part(out_uri, "first_000000")
    checkpoint_fs.move(f"{path}.checkpoint/first_000000.pending.parquet", f"{path}.checkpoint/first_000000.parquet")
    assert storage.exists(f"{out_uri}.checkpoint/first_000000.parquet")

    lease.release()  # the driver has gone (taken over or ended); a worker of its pass goes on
    successor = Lease(lease.uri, "dreamfleet analyze in.parquet").acquire()
    _write_part(out_uri, "orphan_000001")
    with pytest.raises(LeaseLost, match=r"epoch 1 withdrew orphan_000001.pending.parquet .* now epoch 2"):
        checkpoint_fs.move(f"{path}.checkpoint/orphan_000001.pending.parquet",
                           f"{path}.checkpoint/orphan_000001.parquet")  # fmt: skip
    assert storage.listdir(out_uri) == ["first_000000-0.parquet"]
    assert storage.listdir(f"{out_uri}.checkpoint") == ["first_000000.parquet"]
    successor.release()
