"""Wall and CPU seconds of a block, for the CPU benchmarks (one torch thread: CPU time is what a core paid)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Timing:
    wall_s: float
    cpu_s: float


class timed:
    """Wall and CPU seconds of the block, into `.timing`."""

    def __enter__(self) -> timed:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.timing = Timing(time.perf_counter() - self.wall, time.process_time() - self.cpu)
