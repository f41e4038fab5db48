"""The `vlm_engine` setting made concrete: the model a pass's actor holds, on transformers or on vLLM."""

from __future__ import annotations

from engine.settings import Settings
from engine.vlm.model import VLM
from engine.vlm.vllm_engine import VLLMEngine


def load_vlm(name: str, settings: Settings) -> VLM | VLLMEngine:
    """The model `name` on the engine `settings.vlm_engine` names; both answer `generate_constrained` alike."""
    if settings.vlm_engine == "vllm":
        return VLLMEngine(name, settings)
    return VLM(name, settings)
