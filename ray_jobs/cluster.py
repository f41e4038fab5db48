"""Joining a Ray cluster, or starting a local one, with Ray's own console lines kept out of dreamfleet's."""

from __future__ import annotations

import json
import logging
import os

import ray

from ray_jobs.console import quiet_ray
from ray_jobs.state.lease import Lease


def connect(address: str | None, verbose: bool = False, lease: Lease | None = None) -> None:
    """Join the cluster at `address`, or start a local one sized to this machine, unless Ray is already up.
    Unless `verbose`, Ray's own console lines go to its log folder only (see console.py). The driver's `lease`
    then names its Ray job, so a second driver learns which job to stop."""
    if not ray.is_initialized():
        _init(address, verbose)
    if lease is not None:
        lease.set_ray_job_id(_job_name())


def _job_name() -> str:
    job = ray.get_runtime_context().get_job_id()
    # `ray job submit` hands its driver the submission id (what `ray job stop` takes) in the job's configuration.
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    submission = (config.get("metadata") or {}).get("job_submission_id")
    return f"{job} (submission {submission})" if submission else job


def _init(address: str | None, verbose: bool) -> None:
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
