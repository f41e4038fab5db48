"""The tiny VLMs the engine's VLM tests share, loaded once per session (they are read, never changed, by tests)."""

from __future__ import annotations

import pytest
import xgrammar as xgr

from engine.settings import load_settings
from engine.vlm import VLM


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
