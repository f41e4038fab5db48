"""Live figures of a Ray Data pass: model actors on any node send each batch's figures to a small inbox actor as
soon as the batch is done, and the driver drains it twice a second into its progress bar and Prometheus registry.
So the figures are live during the pass, before the batch's rows are written (see metrics.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STATS_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class BatchFigures:
    """What one batch of a pass did, as its model actor counted it."""

    rows: int
    errors: int  # rows that came out with `error` set
    seconds: float  # the batch's model time
    tokens: int = 0  # output tokens (VLM passes)
    scores: dict[str, list[float]] = field(default_factory=dict)  # per-image scores by name (the evaluation pass)


class BatchStatsInbox:
    """A Ray actor in the driver's job holding the figures sent since the last drain."""

    def __init__(self) -> None:
        self.pending: list[BatchFigures] = []

    def add(self, figures: BatchFigures) -> None:
        self.pending.append(figures)

    def drain(self) -> list[BatchFigures]:
        taken, self.pending = self.pending, []
        return taken


def send_batch_figures(inbox: Any, figures: BatchFigures) -> None:
    """From a model actor: one batch's figures; waited for, so they are counted before its rows are written."""
    if inbox is None:
        return
    import ray

    try:
        ray.get(inbox.add.remote(figures), timeout=10)
    except Exception:  # metrics are never worth a lost batch
        pass


class StatsRelay:
    """While the pass runs, hands every batch's figures from the inbox to `on_batch` in the driver."""

    def __init__(self, on_batch: Callable[[BatchFigures], None]):
        import ray

        self.on_batch = on_batch
        self.inbox = ray.remote(num_cpus=0)(BatchStatsInbox).remote()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> StatsRelay:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._drain()

    def _poll(self) -> None:
        while not self.stop.wait(STATS_POLL_SECONDS):
            self._drain()

    def _drain(self) -> None:
        import ray

        try:
            figures = ray.get(self.inbox.drain.remote(), timeout=30)
        except Exception:  # the inbox died with its node: the figures of the batches it held are lost
            return
        for batch in figures:
            self.on_batch(batch)
