"""The lease on a RUN or a pass output, on a local disk and on S3 (moto's server): one holder among racing drivers
(threads and processes), renewal keeps it, release frees it, a dead or stalled holder's lease is taken over, and
the command says so."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from engine import storage
from ray_jobs.state.lease import Holder, Lease, LeaseHeld, LeaseLost, held, read_holder, run_lease_uri

REPO = Path(__file__).resolve().parents[3]

# A driver in another process: waits for `go`, tries the lease, says what happened, holds it until `done` exists.
DRIVER = """
import sys, time, pathlib
from ray_jobs.state.lease import Lease, LeaseHeld
uri, ttl, folder = sys.argv[1], float(sys.argv[2]), pathlib.Path(sys.argv[3])
print("ready", flush=True)
while not (folder / "go").exists():
    time.sleep(0.002)
try:
    lease = Lease(uri, "dreamfleet train m.parquet", ttl=ttl, say=lambda m: print(m, flush=True)).acquire()
except LeaseHeld as err:
    print("held:", err, flush=True)
    sys.exit(2)
print("won", lease.epoch, flush=True)
while not (folder / "done").exists():
    time.sleep(0.02)
lease.release()
"""


@pytest.fixture(params=["local", "s3"])
def lease_uri(request, tmp_path) -> str:
    """A fresh RUN's lease file, on a local disk or in a bucket of moto's S3 server."""
    if request.param == "local":
        return run_lease_uri(str(tmp_path / "run"))
    request.getfixturevalue("s3_endpoint")
    bucket = f"lease-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    return run_lease_uri(f"s3://{bucket}/run")


def start_drivers(uri: str, folder: Path, n: int, ttl: float = 30.0) -> list[subprocess.Popen]:
    folder.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    drivers = [subprocess.Popen([sys.executable, "-c", DRIVER, uri, str(ttl), str(folder)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO) for _ in range(n)]  # fmt: skip
    for driver in drivers:
        assert driver.stdout.readline().strip() == "ready"
    return drivers


def test_racing_threads_one_holder(lease_uri):
    for round_ in range(3):  # epochs grow across rounds: each round releases, the next acquires again
        barrier, winners, refused = threading.Barrier(6), [], []

        def race() -> None:
            barrier.wait()
            try:
                winners.append(Lease(lease_uri, "dreamfleet run m.parquet", ttl=30).acquire())
            except LeaseHeld as err:
                refused.append(str(err))

        threads = [threading.Thread(target=race) for _ in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(winners) == 1 and len(refused) == 5, refused
        assert f"pid {os.getpid()}" in refused[0] and re.search(r"renewed \d+ s ago", refused[0])
        assert winners[0].epoch == round_ + 1
        winners[0].release()
    assert read_holder(lease_uri).released is not None


def test_racing_processes_one_holder(lease_uri, tmp_path):
    drivers = start_drivers(lease_uri, tmp_path / "sync", 4)
    (tmp_path / "sync" / "go").touch()
    lines = [d.stdout.readline().strip() for d in drivers]
    assert sorted(line.split()[0] for line in lines) == ["held:"] * 3 + ["won"], lines
    winner = drivers[[line.startswith("won") for line in lines].index(True)]
    assert all(f"pid {winner.pid}" in line for line in lines if line.startswith("held"))
    (tmp_path / "sync" / "done").touch()
    assert sorted(d.wait(timeout=30) for d in drivers) == [0, 2, 2, 2]
    assert read_holder(lease_uri).pid == winner.pid and read_holder(lease_uri).released is not None


def test_renewal_keeps_it_and_release_frees_it(lease_uri):
    said, ttl = [], 1.0
    with held(lease_uri, "dreamfleet analyze in.parquet", ttl=ttl, say=said.append) as first:
        started, deadline = read_holder(lease_uri).renewed, time.monotonic() + 60
        while read_holder(lease_uri).renewed < started + 1.5 * ttl:  # alive past its time to live: renewed
            assert time.monotonic() < deadline, "never renewed"
            time.sleep(0.05)
        with pytest.raises(LeaseHeld, match="dreamfleet analyze in.parquet"):
            Lease(lease_uri, "dreamfleet analyze in.parquet", ttl=ttl).acquire()
        first.check()
    with held(lease_uri, "dreamfleet analyze in.parquet", ttl=ttl, say=said.append) as second:
        assert second.epoch == first.epoch + 1 and second.previous is None
    assert said == []  # a released lease is simply acquired again


def test_a_dead_hosts_lease_is_taken_over_after_it_expires(lease_uri):
    now = time.time()
    crashed = Holder(host="gpu-node-7", pid=4242, command="dreamfleet run m.parquet --out RUN", started=now - 600,
                     renewed=now - 5, epoch=3, ttl=60, token="x", ray_job_id="02000000",
                     machine="gpu-node-7/boot")  # another machine: only the lease's age can tell it is dead
    storage.write_bytes(lease_uri, crashed.to_bytes())
    with pytest.raises(LeaseHeld) as refused:
        Lease(lease_uri, "dreamfleet run m.parquet --out RUN").acquire()
    message = str(refused.value)
    assert "host gpu-node-7 pid 4242, Ray job 02000000" in message and re.search(r"renewed [5-9] s ago", message)

    storage.write_bytes(lease_uri, json.dumps({**json.loads(crashed.to_bytes()), "renewed": now - 75}).encode())
    said = []
    with held(lease_uri, "dreamfleet run m.parquet --out RUN", say=said.append) as lease:
        assert lease.epoch == 4 and lease.previous.host == "gpu-node-7"
    assert len(said) == 1 and "taking over" in said[0] and "host gpu-node-7 pid 4242" in said[0]
    assert re.search(r"not renewed for 7\d s \(time to live 60 s\)", said[0]) and "started 10 min ago" in said[0]


def test_killed_holder_taken_over_at_once_and_stalled_holder_loses(lease_uri, tmp_path):
    """A SIGKILLed driver on this machine: its pid is gone, so no need to wait out the lease. A stalled one (SIGSTOP,
    as a long pause or a partition): taken over once expired; when it wakes, its renewal fails and it says so."""
    (killed,) = start_drivers(lease_uri, tmp_path / "a", 1)
    (tmp_path / "a" / "go").touch()
    assert killed.stdout.readline().startswith("won 1")
    killed.kill()
    killed.wait()
    said = []
    with held(lease_uri, "rerun", say=said.append) as lease:
        assert lease.epoch == 2
    assert len(said) == 1 and f"pid {killed.pid}" in said[0] and "its process is gone" in said[0], said

    (stalled,) = start_drivers(lease_uri, tmp_path / "b", 1, ttl=0.6)
    (tmp_path / "b" / "go").touch()
    assert stalled.stdout.readline().startswith("won 3")
    stalled.send_signal(signal.SIGSTOP)
    time.sleep(1.0)
    with held(lease_uri, "rerun", say=said.append) as lease:
        assert lease.epoch == 4 and "not renewed for" in said[-1]
        stalled.send_signal(signal.SIGCONT)
        line = stalled.stdout.readline()
        assert line.startswith("error: the lease") and "(epoch 3) was taken over by" in line and "rerun" in line
        (tmp_path / "b" / "done").touch()
        assert stalled.wait(timeout=30) == 0
        assert read_holder(lease_uri).epoch == 4 and read_holder(lease_uri).released is None  # left to the new holder
        lease.check()


def test_a_holder_that_cannot_renew_knows_it_lost(lease_uri):
    lease = Lease(lease_uri, "dreamfleet generate m.parquet", ttl=30).acquire()
    rival = Holder.from_bytes(storage.read_bytes(lease_uri))
    storage.write_bytes(lease_uri, json.dumps({**json.loads(rival.to_bytes()), "token": "other", "epoch": 9}).encode())
    with pytest.raises(LeaseLost, match="was taken over"):
        lease.renew()
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()  # leaves the new holder's lease alone
    assert read_holder(lease_uri).epoch == 9 and read_holder(lease_uri).released is None


def test_a_command_that_ran_nothing_leaves_no_lease_behind(lease_uri):
    run = lease_uri.rsplit("/", 1)[0]
    Lease(lease_uri, "dreamfleet train bad.parquet").acquire().release(ran=False)
    assert not storage.exists(lease_uri) and not storage.exists(run)
    first = Lease(lease_uri, "dreamfleet train m.parquet").acquire()
    first.release()
    again = Lease(lease_uri, "dreamfleet train bad.parquet").acquire()
    again.release(ran=False)  # a lease that was there before stays, released, and keeps its epoch
    assert read_holder(lease_uri).epoch == 2 and read_holder(lease_uri).released is not None


def test_a_lease_file_no_driver_wrote_is_left_alone_with_a_reason(lease_uri):
    storage.write_bytes(lease_uri, b'{"host": "vm", "pid": ')  # torn, or edited by hand
    with pytest.raises(LeaseHeld, match="is not a lease dreamfleet can read .* remove the file and run again"):
        Lease(lease_uri, "dreamfleet run m.parquet").acquire()
    assert storage.read_bytes(lease_uri) == b'{"host": "vm", "pid": '
