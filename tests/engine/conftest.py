"""The tiny VLMs the engine's VLM tests share, loaded once per session (they are read, never changed, by tests)."""

from __future__ import annotations

import pytest
import xgrammar as xgr

from engine.settings import load_settings
from engine.vlm.model import VLM


@pytest.fixture(scope="session")
def dense() -> VLM:
    return VLM("tiny", load_settings("tiny"))


@pytest.fixture(scope="session")
def thinking() -> VLM:
    return VLM("tiny-moe-thinking", load_settings("tiny"))


@pytest.fixture(scope="session")
def info(dense) -> xgr.TokenizerInfo:
    """The tiny VLM's tokens as the decoder sees them: their bytes, and the stop token."""
    return xgr.TokenizerInfo.from_huggingface(dense.processor.tokenizer, vocab_size=dense.vocab_size)


@pytest.fixture(scope="session")
def prior_path(model_cache):
    """tiny-prior, built once per session into the private cache (about a minute cold; see engine/tiny_prior.py)."""
    from engine.diffusion.base_model import resolve_base_model

    return resolve_base_model("tiny-prior", model_cache)


@pytest.fixture(scope="session")
def prior_base(prior_path):
    from engine.diffusion.base_model import load_base_model

    return load_base_model(prior_path, "cpu")
