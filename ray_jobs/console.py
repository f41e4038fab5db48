"""What a dreamfleet driver prints: its own progress and summary; Ray's own lines only under --verbose.

Ray's lines are not lost when quiet: they are in Ray's log folder as always (the driver's session logs), where the
C++ core's stderr copy goes too.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from pathlib import Path


def quiet_ray(log_dir: str | None) -> None:
    """Silence Ray's console output in this driver, once `ray.init` has run.

    Ray's C++ core writes its warnings and errors to file descriptor 2 as well as to its own log file (e.g.
    `core_worker.cc ... E ... constructor arguments`, printed for every Ray Data actor pool). So fd 2 is pointed at
    a file in Ray's log folder, and dreamfleet's own messages keep the terminal through `sys.stderr`, re-opened on
    a copy of the original descriptor."""
    import ray.data  # noqa: F401  Ray Data sets its logging up when first imported: do that first, then quieten it

    for name in ("ray", "ray.data"):  # their records still reach Ray's log files through the file handlers
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if log_dir is None or not _is_real_stderr():
        return
    sys.stderr.flush()
    own = os.dup(2)
    with open(Path(log_dir) / f"dreamfleet-driver-{os.getpid()}.err", "ab") as log:
        os.dup2(log.fileno(), 2)
    sys.stderr = io.TextIOWrapper(os.fdopen(own, "wb", buffering=0), write_through=True, line_buffering=True)


def _is_real_stderr() -> bool:
    """True when sys.stderr is the process's fd 2 (not a test's capture or a caller's redirection)."""
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False
