"""One driver at a time on a RUN or a pass output: a lease file its driver holds, renews, releases, and that a
second driver either stops at (`LeaseHeld`) or, when the holder is gone, takes over.

The lease is one JSON file (`RUN/.lease.json`, `OUT.lease.json` beside a pass output) holding the driver's identity,
when it was last renewed and an epoch that grows by one at every acquisition (a fencing token: work started under
an older epoch must not commit). Every change is a compare-and-swap, atomic where the store has one:
- a local disk (or NFS): exclusive create by `os.link` of a complete temporary file; take-over, renewal and release
  under `flock` on a sibling `.lock` file, compared with what was read;
- S3 (s3fs): conditional PUTs, `If-None-Match: *` to create and `If-Match: <etag>` to take over, renew or release,
  sent through s3fs's botocore client (s3fs's own writes cannot send `If-Match`);
- memory:// (private to one process): a process-wide lock, so exact;
- any other store (gcs, azure, http...): best effort: write, then read back and keep the lease only if what was read
  is ours. Two drivers starting within one round trip there may both believe they hold it; renewal notices the
  loser at its next beat.
Ages are measured with the wall clocks of the hosts involved: a clock skewed by more than the lease's time to live
makes a live lease look dead (or a dead one live for longer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from engine import storage

log = logging.getLogger(__name__)

LEASE_FILE = ".lease.json"
DEFAULT_TTL_SECONDS = 60.0
RENEWALS_PER_TTL = 4  # a renewal every ttl/4 s: three beats may fail (a slow store) before the lease lapses
ACQUIRE_TRIES = 5  # each lost race re-reads the lease; more than a few means the store is churning


def run_lease_uri(run: str) -> str:
    """The lease of a run directory, inside it."""
    return storage.join(run, LEASE_FILE)


def output_lease_uri(out: str) -> str:
    """The lease of a pass output, beside it: readers of OUT should see nothing but part files."""
    return out.rstrip("/") + ".lease.json"


class LeaseHeld(RuntimeError):
    """Another driver holds the lease and renews it; the message names it and how old its lease is."""

    def __init__(self, uri: str, holder: Holder, now: float):
        self.holder = holder
        super().__init__(
            f"{uri} is held by another driver: {holder.describe()}; renewed {holder.age(now):.0f} s ago, started "
            f"{_since(holder.started, now)} ago. Wait for it to end or stop it; a lease not renewed for "
            f"{holder.ttl:.0f} s (a dead driver) is taken over by the next command"
        )


class LeaseUnreadable(LeaseHeld):
    """The lease file holds what no driver wrote (a torn copy on a best-effort store, a hand edit): nobody can tell
    whether its driver lives, so nothing takes it over by itself."""

    def __init__(self, uri: str, err: Exception):
        self.holder = None
        RuntimeError.__init__(self, f"{uri} is not a lease dreamfleet can read ({type(err).__name__}: {err}); if no "
                                    "driver is running on this RUN or output, remove the file and run again")  # fmt: skip


class LeaseLost(RuntimeError):
    """This driver's lease was taken over (it stalled past its time to live) or could not be renewed: stop writing."""


@dataclass(frozen=True)
class Holder:
    """What a lease file holds: who holds it, since when, under which epoch."""

    host: str
    pid: int
    command: str
    started: float  # unix seconds
    renewed: float
    epoch: int
    ttl: float
    token: str  # this acquisition's own id
    ray_job_id: str | None = None
    machine: str = ""  # host + boot + pid namespace: where `pid` means this process
    pid_start: str = ""  # the process's start tick: a reused pid is someone else
    released: float | None = None

    def age(self, now: float) -> float:
        return max(0.0, now - self.renewed)

    def expired(self, now: float) -> bool:
        return self.age(now) > self.ttl

    def gone(self) -> bool:
        """Whether the holder's process is visibly dead: it ran on this machine and its pid is gone (or reused)."""
        return self.machine == _machine() and _process_start(self.pid) != self.pid_start

    def describe(self) -> str:
        job = f", Ray job {self.ray_job_id}" if self.ray_job_id else ""
        return f"host {self.host} pid {self.pid}{job}, `{self.command}` (epoch {self.epoch})"

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, uri: str = "") -> Holder:
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in json.loads(data).items() if k in fields})
        except (ValueError, TypeError, AttributeError) as err:
            raise LeaseUnreadable(uri, err) from None


def _since(then: float, now: float) -> str:
    seconds = max(0.0, now - then)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _machine() -> str:
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        with contextlib.suppress(OSError):
            parts.append(open(path).read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _process_start(pid: int) -> str:
    """The start tick of a live process `pid` ("" when none, or a zombie: killed, not yet reaped)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return "" if fields[0] in ("Z", "X") else fields[19]


# --- Stores: read, create, compare-and-swap. A tag names the version that was read. ---------------------------


class LeaseStore:
    """Best effort, for stores without conditional writes: write, then read back."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = storage.filesystem(uri)

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> str | None:
        if self.read() is not None:
            return None
        return self._write_and_check(data)

    def swap(self, data: bytes, tag: str) -> str | None:
        current = self.read()
        if current is None or current[1] != tag:
            return None
        return self._write_and_check(data)

    def delete(self, tag: str) -> None:
        """Remove the lease file if it is still the version `tag` names."""
        current = self.read()
        if current is not None and current[1] == tag:
            self.fs.rm(self.path)

    def _write_and_check(self, data: bytes) -> str | None:
        self.fs.pipe_file(self.path, data)
        current = self.read()
        return current[1] if current is not None and current[0] == data else None


class LocalLeaseStore(LeaseStore):
    """A local or network disk: create by hard link (atomic and exclusive, also on NFS), swap under flock."""

    created_folder = False  # whether creating the lease made its folder (RUN), to be removed with it

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> str | None:
        folder = os.path.dirname(self.path) or "."
        self.created_folder = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return hashlib.sha256(data).hexdigest()

    def swap(self, data: bytes, tag: str) -> str | None:
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
            current = self.read()
            if current is None or current[1] != tag:
                return None
            storage.write_bytes(self.path, data)  # temporary file, fsync, rename: never torn
            return hashlib.sha256(data).hexdigest()

    def delete(self, tag: str) -> None:
        # Only a live holder deletes, and nobody swaps a live lease: neither the file nor its lock is in use.
        super().delete(tag)
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{self.path}.lock")
        if self.created_folder:
            with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                os.rmdir(os.path.dirname(self.path))


_MEMORY_LOCK = threading.Lock()


class MemoryLeaseStore(LeaseStore):
    """memory:// lives in one process, so one process-wide lock makes every change exact."""

    def create(self, data: bytes) -> str | None:
        with _MEMORY_LOCK:
            return super().create(data)

    def swap(self, data: bytes, tag: str) -> str | None:
        with _MEMORY_LOCK:
            return super().swap(data, tag)


class S3LeaseStore(LeaseStore):
    """S3 conditional writes (2024): a PUT with If-None-Match creates only; one with If-Match replaces only the
    version read. Sent through s3fs's own botocore client, so credentials and endpoint are the same."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.bucket, self.key, _ = self.fs.split_path(self.path)

    def read(self) -> tuple[bytes, str] | None:
        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = response["Body"]
            try:
                return await body.read(), response["ETag"]
            finally:
                body.close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def delete(self, tag: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=tag)
        except (FileNotFoundError, OSError):  # gone, or replaced meanwhile: not ours to delete any more
            pass
        finally:
            self.fs.invalidate_cache(self.path)

    def swap(self, data: bytes, tag: str) -> str | None:
        return self._put(data, IfMatch=tag)

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except (FileExistsError, FileNotFoundError):  # created meanwhile / gone meanwhile
            return None
        except OSError as err:
            code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")
            # 412: the version changed; 409: another conditional write on the key was in flight (S3 says retry:
            # the caller re-reads and sees the winner)
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return response["ETag"]


def lease_store(uri: str) -> LeaseStore:
    fs, _ = storage.filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return LocalLeaseStore(uri)
    if isinstance(fs, MemoryFileSystem):
        return MemoryLeaseStore(uri)
    if "s3" in fs.protocol or "s3a" in fs.protocol:
        return S3LeaseStore(uri)
    return LeaseStore(uri)


# --- The lease a driver holds -------------------------------------------------------------------------------


class Lease:
    """This driver's lease on `uri` (a lease file): `acquire`, then renewed on a daemon thread until `release`."""

    def __init__(self, uri: str, command: str, ttl: float = DEFAULT_TTL_SECONDS, ray_job_id: str | None = None,
                 say: Callable[[str], None] | None = None):  # fmt: skip
        self.uri = uri
        self.command = command
        self.ttl = float(ttl)
        self.ray_job_id = ray_job_id
        self.say = say or log.warning
        self.store = lease_store(uri)
        self.holder: Holder | None = None
        self.previous: Holder | None = None  # whose lease this one took over, if any
        self._tag = ""
        self._renewed_at = 0.0  # monotonic time of the last successful write
        self._lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def epoch(self) -> int:
        assert self.holder is not None, "the lease is not held"
        return self.holder.epoch

    def acquire(self) -> Lease:
        """Hold the lease or raise `LeaseHeld`; a released, expired or visibly dead holder's lease is taken over."""
        for _ in range(ACQUIRE_TRIES):
            current = self.store.read()
            now = time.time()
            if current is None:
                tag = self.store.create((mine := self._holder(epoch=1, now=now)).to_bytes())
                previous = None
            else:
                previous = Holder.from_bytes(current[0], self.uri)
                if previous.released is None and not previous.expired(now) and not previous.gone():
                    raise LeaseHeld(self.uri, previous, now)
                tag = self.store.swap((mine := self._holder(previous.epoch + 1, now)).to_bytes(), current[1])
            if tag is not None:
                self._held(mine, tag)
                if previous is not None and previous.released is None:
                    self.previous = previous
                    why = "its process is gone" if previous.gone() else (
                        f"not renewed for {previous.age(now):.0f} s (time to live {previous.ttl:.0f} s)")
                    self.say(f"taking over {self.uri} from {previous.describe()}, started "
                             f"{_since(previous.started, now)} ago: {why}")  # fmt: skip
                return self
        raise LeaseHeld(self.uri, Holder.from_bytes(self.store.read()[0], self.uri), time.time())

    def _holder(self, epoch: int, now: float) -> Holder:
        return Holder(host=socket.gethostname(), pid=os.getpid(), command=self.command, started=now, renewed=now,
                      epoch=epoch, ttl=self.ttl, token=uuid.uuid4().hex, ray_job_id=self.ray_job_id,
                      machine=_machine(), pid_start=_process_start(os.getpid()))  # fmt: skip

    def _held(self, holder: Holder, tag: str) -> None:
        self.holder, self._tag, self._renewed_at, self._lost = holder, tag, time.monotonic(), None
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep_renewing, name=f"lease {self.uri}", daemon=True)
        self._thread.start()

    def _keep_renewing(self) -> None:
        while not self._stop.wait(self.ttl / RENEWALS_PER_TTL):
            try:
                self.renew()
            except LeaseLost as err:
                self.say(f"error: {err}")
                return
            except OSError as err:  # a slow or flaky store: try again at the next beat, lapse if it never recovers
                log.warning("could not renew %s: %s", self.uri, err)

    def _update(self, **changes) -> None:
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            assert self.holder is not None, "the lease is not held"
            changed = dataclasses.replace(self.holder, **changes)
            tag = self.store.swap(changed.to_bytes(), self._tag)
            if tag is None:
                current = self.store.read()
                try:
                    other = Holder.from_bytes(current[0]).describe() if current else "nobody (the lease file is gone)"
                except LeaseUnreadable:
                    other = "a file no driver wrote"
                self._lost = f"the lease on {self.uri} (epoch {self.holder.epoch}) was taken over by {other}"
                raise LeaseLost(self._lost)
            self.holder, self._tag, self._renewed_at = changed, tag, time.monotonic()

    def renew(self) -> None:
        self._update(renewed=time.time())

    def set_ray_job_id(self, ray_job_id: str) -> None:
        """Record the Ray job once the driver has connected (the lease is taken before, so a refusal is quick)."""
        self.ray_job_id = ray_job_id
        self._update(ray_job_id=ray_job_id, renewed=time.time())

    def check(self) -> None:
        """Raise `LeaseLost` if this lease was taken over, or has not been renewed for its time to live."""
        if self._lost:
            raise LeaseLost(self._lost)
        if time.monotonic() - self._renewed_at > self.ttl:
            raise LeaseLost(f"the lease on {self.uri} was not renewed for {self.ttl:.0f} s; another driver may "
                            "have taken it over")  # fmt: skip

    def release(self, ran: bool = True) -> None:
        """Stop renewing and mark the lease released (the file stays: it keeps the epoch growing, and says who ran
        last). A lease already lost is left to its new holder. `ran=False`: the command wrote nothing, so a lease
        it created (there was none before) is removed, and a refused command leaves no trace."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if not ran and not self._lost and self.holder is not None and self.holder.epoch == 1:
                self.store.delete(self._tag)
                return
        with contextlib.suppress(LeaseLost):
            self._update(released=time.time())

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def held(uri: str, command: str, ttl: float = DEFAULT_TTL_SECONDS, ray_job_id: str | None = None,
         say: Callable[[str], None] | None = None) -> Iterator[Lease]:  # fmt: skip
    """The lease on `uri` for the block: raises `LeaseHeld` at once if another driver holds it."""
    lease = Lease(uri, command, ttl=ttl, ray_job_id=ray_job_id, say=say).acquire()
    try:
        yield lease
    finally:
        lease.release()


def read_holder(uri: str) -> Holder | None:
    """What the lease file at `uri` says, or None when there is none (for status, reports and fencing checks)."""
    current = lease_store(uri).read()
    return Holder.from_bytes(current[0]) if current else None
