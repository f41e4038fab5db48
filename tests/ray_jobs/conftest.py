"""Real services for fleet tests: an S3 API server (moto's server mode) on loopback and a local Ray cluster."""

from __future__ import annotations

import os

import pytest

from tests.helpers.services import ACCESS_KEY_ID, SECRET_ACCESS_KEY


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A loopback S3 endpoint; set in the environment before Ray starts, so workers inherit it like real creds."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID=ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY,
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint, model_cache):
    """One local cluster for the session with 2 logical GPUs, so packing is visible on a CPU machine."""
    import ray

    # address="local": a cluster of its own, never one another process on the machine started (ray.init() alone joins that)
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def vllm_cluster(model_cache):
    """A local cluster whose workers inherit a small vLLM KV cache (the CPU backend reserves 4 GiB by default)."""
    import ray
    import vllm  # noqa: F401  (a missing vLLM fails here, never skips)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # address="local": a new cluster of its own, never the latest one another process on this machine started
    # (ray.init's default joins that one, found through /tmp/ray/ray_current_cluster).
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
