"""Real services for fleet tests: an S3 API server (moto's server mode) on loopback and a local Ray cluster."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import pytest

from tests.conftest import draw_subject

# Credentials that look like real ones and appear nowhere else, so a test can search for leaks of them.
ACCESS_KEY_ID = "AKIADREAMFLEETTEST42"
SECRET_ACCESS_KEY = "dfSecret/" + secrets.token_hex(16)


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

    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_subject_rows(folder: Path, n: int, classes=("ball", "box"), prefix: str = "s") -> list[dict]:
    rows = []
    for i in range(n):
        images = folder / f"{prefix}{i}"
        images.mkdir(parents=True, exist_ok=True)
        uris = [str(draw_subject(images / f"{k}.png", shift=i + k)) for k in range(3)]
        cls = classes[i % len(classes)]
        rows.append(
            {
                "subject_id": f"{prefix}{i}",
                "instance_images": uris,
                "instance_prompt": f"a photo of sks {cls}",
                "class_prompt": f"a photo of a {cls}",
            }
        )
    return rows


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
