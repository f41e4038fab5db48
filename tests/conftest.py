"""Shared fixtures: one tiny base model per test session (built offline), and real subject images on disk."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

warnings.filterwarnings("ignore", category=UserWarning)


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


def draw_subject(path: Path, shift: int = 0, size: tuple[int, int] = (48, 40)) -> Path:
    """A yellow ball on blue: a simple, recognisable subject."""
    image = Image.new("RGB", size, (30, 60, 200))
    ImageDraw.Draw(image).ellipse((8 + shift, 6, 38 + shift, 34), fill=(240, 200, 20))
    image.save(path)
    return path


@pytest.fixture
def subject_images(tmp_path: Path) -> list[str]:
    folder = tmp_path / "subject"
    folder.mkdir()
    return [str(draw_subject(folder / f"ball-{i}.png", shift=i)) for i in range(4)]


class Interrupted(Exception):
    """Raised from a step callback to stop training as a kill would, after that step's checkpoint (if any)."""


def stop_at(step: int):
    """A step callback that raises Interrupted once training reaches `step`."""

    def on_step(record):
        if record.step == step:
            raise Interrupted

    return on_step
