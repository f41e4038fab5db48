"""The vision-language model side: a Qwen3-VL model on transformers (model.py) or on vLLM (vllm_engine.py; engines.py
picks by `vlm_engine`), grammars for constrained decoding (constrained.py)
and one module per task (tasks/). Imports engine.media, engine.settings and engine.hub; never Ray, never
engine.diffusion."""
