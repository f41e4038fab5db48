"""A prompt longer than the base's text encoder reads is measured: how many tokens it has and how many are cut."""

from __future__ import annotations

from engine.diffusion.prompts import base_tokenizers, prompt_warnings


def test_a_prompt_over_the_encoders_limit_says_how_many_tokens_are_cut(tiny_path):
    tokenizers = base_tokenizers(tiny_path)
    assert list(tokenizers) == ["tokenizer"] and tokenizers["tokenizer"].model_max_length == 77
    long = "a photo of sks dog " * 6
    warnings = prompt_warnings(tokenizers, {"instance_prompt": "a photo of sks dog", "prompts[1]": long})
    assert warnings == ["prompts[1] is 86 tokens long, over the 77 its text encoder reads: its last 9 tokens are cut"]
