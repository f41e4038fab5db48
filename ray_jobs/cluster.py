"""Joining a Ray cluster, or starting a local one, with Ray's own console lines kept out of dreamfleet's."""

from __future__ import annotations

import logging

import ray

from ray_jobs.console import quiet_ray


def connect(address: str | None, verbose: bool = False) -> None:
    """Join the cluster at `address`, or start a local one sized to this machine, unless Ray is already up.
    Unless `verbose`, Ray's own console lines go to its log folder only (see console.py)."""
    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.ERROR
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=verbose)
    else:
        ray.init(include_dashboard=False, logging_level=level, log_to_driver=verbose)
    if not verbose:
        quiet_ray(_logs_dir())


def _logs_dir() -> str | None:
    node = getattr(ray._private.worker, "_global_node", None)  # no public API names the driver's log folder
    return node.get_logs_dir_path() if node is not None else None
