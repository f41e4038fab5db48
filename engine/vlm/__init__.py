"""The vision-language model side: a Qwen3-VL model (model.py), grammars for constrained decoding (constrained.py)
and one module per task (tasks/). Imports engine.media, engine.settings and engine.hub; never Ray, never
engine.diffusion."""
