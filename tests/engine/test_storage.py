"""Storage under faults: transient errors are retried, nothing is torn, and permanent errors still surface."""

from __future__ import annotations

import random

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from engine import storage
from engine.diffusion.checkpoints import (
    TrainingState,
    load_latest_checkpoint,
    save_checkpoint,
)


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory filesystem whose calls fail at `failure_rate`, as a throttled or flaky object store does."""

    protocol = "flaky"
    failure_rate = 0.15
    rng = random.Random(0)
    failures = 0

    def _maybe_fail(self) -> None:
        if FlakyFileSystem.rng.random() < FlakyFileSystem.failure_rate:
            FlakyFileSystem.failures += 1
            raise ConnectionResetError("injected fault")

    def pipe_file(self, path, value, **kwargs):
        self._maybe_fail()
        return super().pipe_file(path, value, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._maybe_fail()
        return super().cat_file(path, start, end, **kwargs)

    def exists(self, path, **kwargs):
        self._maybe_fail()
        return super().exists(path, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        self._maybe_fail()
        return super().ls(path, detail=detail, **kwargs)


@pytest.fixture
def flaky(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.001)
    FlakyFileSystem.failure_rate, FlakyFileSystem.failures = 0.15, 0
    FlakyFileSystem.rng.seed(0)
    return FlakyFileSystem


def _state(step: int) -> TrainingState:
    param = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.AdamW([param])
    param.sum().backward()
    optimizer.step()
    return TrainingState(step, {"w": param.detach().clone()}, optimizer.state_dict(), {"last_epoch": step},
                         {"generator": torch.Generator().manual_seed(step).get_state()}, {"log": []})  # fmt: skip


def test_checkpoints_and_statuses_survive_a_flaky_store(flaky):
    for step in (5, 10, 15):
        saved = _state(step)
        save_checkpoint("flaky://run/subjects/a/checkpoints", saved, keep=2)
        storage.write_json("flaky://run/subjects/a/status.json", {"state": "training", "step": step})
    loaded = load_latest_checkpoint("flaky://run/subjects/a/checkpoints")
    assert loaded.step == 15 and torch.equal(loaded.trainable["w"], saved.trainable["w"])
    assert storage.read_json("flaky://run/subjects/a/status.json") == {"state": "training", "step": 15}
    assert flaky.failures > 0  # the faults really happened, and were absorbed


def test_a_store_that_keeps_failing_is_reported_and_the_last_checkpoint_stays_good(flaky):
    flaky.failure_rate = 0.0
    save_checkpoint("flaky://run/c", _state(10), keep=2)
    flaky.failure_rate = 1.0
    with pytest.raises(ConnectionResetError, match="injected fault"):
        storage.write_bytes("flaky://run/x", b"data")
    assert flaky.failures == storage.RETRIES
    with pytest.raises(ConnectionResetError):  # an outage while the next checkpoint is saved
        save_checkpoint("flaky://run/c", _state(20), keep=2)
    flaky.failure_rate = 0.0
    assert load_latest_checkpoint("flaky://run/c").step == 10


def test_a_missing_file_is_not_retried(flaky):
    flaky.failure_rate = 0.0
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("flaky://run/absent")
