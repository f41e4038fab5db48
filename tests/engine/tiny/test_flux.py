"""tiny-flux and tiny-flux2: built offline from a seed (every tokenizer in code), the same bytes every time, and
rendered by the stock FluxPipeline / Flux2KleinPipeline loaded with from_pretrained."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from engine.tiny.flux import build_qwen_tokenizer, build_t5_tokenizer, build_tiny_flux, build_tiny_flux2
from engine.tiny.registry import BASE_MODELS

BUILDS = {"tiny-flux": build_tiny_flux, "tiny-flux2": build_tiny_flux2}


def _weights_digest(folder) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*.safetensors")):
        digest.update(file.relative_to(folder).as_posix().encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-flux2"])
def test_it_is_built_the_same_from_a_seed_and_the_stock_pipeline_renders_it(name, model_cache, tmp_path):
    from diffusers import DiffusionPipeline

    path = BASE_MODELS[name](model_cache)
    BUILDS[name](tmp_path / "again", seed=0)
    assert _weights_digest(path) == _weights_digest(tmp_path / "again")
    assert not list(path.rglob("*.bin"))  # safetensors only

    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == {"tiny-flux": "FluxPipeline", "tiny-flux2": "Flux2KleinPipeline"}[name]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a photo of a ball", "a box"], height=32, width=32, num_inference_steps=2,
                  generator=[torch.Generator().manual_seed(i) for i in range(2)], max_sequence_length=32,
                  output_type="np").images  # fmt: skip
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    if name == "tiny-flux":
        assert pipe.transformer.config.guidance_embeds  # the [dev] path: a guidance embedding
    else:
        assert not pipe.config.is_distilled and not pipe.transformer.config.guidance_embeds  # true CFG


def test_the_tokenizers_built_in_code_cover_any_text():
    t5 = build_t5_tokenizer()
    ids = t5("a photo of sks dog, ÉTÉ 2026!").input_ids
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id
    qwen = build_qwen_tokenizer()
    text = qwen.apply_chat_template([{"role": "user", "content": "a dog"}], tokenize=False, add_generation_prompt=True,
                                    enable_thinking=False)  # fmt: skip
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # as Qwen3 closes thinking
    tokens = qwen.convert_ids_to_tokens(qwen(text).input_ids)
    assert tokens[0] == "<|im_start|>" and tokens.count("<|im_end|>") == 1
