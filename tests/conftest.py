"""Shared fixtures: one tiny base model per test session (built offline), and real subject images on disk."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from tests.helpers.subjects import draw_subject

warnings.filterwarnings("ignore", category=UserWarning)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`slow` means: starts a Ray cluster (through the `ray_cluster` fixture, marked here, or in a subprocess, marked by
    hand) or trains a model for more than a few seconds. `make test-quick` runs everything else."""
    for item in items:
        if "ray_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _quick_tests_start_no_cluster(request):
    """Holds the rule above: a test not marked slow that leaves Ray initialised in this process fails."""
    import ray

    before = ray.is_initialized()
    yield
    if not before and ray.is_initialized() and request.node.get_closest_marker("slow") is None:
        pytest.fail("this test started Ray: mark it slow (tests/conftest.py says what slow means)")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Tests build their tiny models in a private cache, never touching the user's or the network."""
    cache = Path(os.environ.get("DREAMFLEET_TEST_CACHE") or tmp_path_factory.mktemp("model-cache"))
    os.environ["DREAMFLEET_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


@pytest.fixture(scope="session")
def tiny_path(model_cache: Path) -> Path:
    from engine.diffusion.base_model import resolve_base_model

    return resolve_base_model("tiny", model_cache)


@pytest.fixture(scope="session")
def base(tiny_path: Path):
    """One resident base model shared by the session's tests, as a fleet worker shares it between subjects."""
    from engine.diffusion.base_model import load_base_model

    return load_base_model(tiny_path, "cpu")


@pytest.fixture
def subject_images(tmp_path: Path) -> list[str]:
    folder = tmp_path / "subject"
    folder.mkdir()
    return [str(draw_subject(folder / f"ball-{i}.png", shift=i)) for i in range(4)]
