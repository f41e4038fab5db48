import json

import jsonschema
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from engine.tiny.vlm import TINY_VLM_VERSION, VARIANTS, build_tiny_vlm, ensure_tiny_vlm

INVOICE_SCHEMA = {
    "type": "object",
    # A random model never stops writing digits on its own: the bounds are what make the JSON close.
    "properties": {"total": {"type": "number", "minimum": 0, "maximum": 100000}, "date": {"type": "string", "maxLength": 10}},
    "required": ["total", "date"],
}


def load(variant: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = ensure_tiny_vlm(variant=variant)
    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path).eval()


def user_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def two_images() -> list[Image.Image]:
    """Two pictures of different sizes, so their image-token counts and prompt lengths differ."""
    receipt = Image.new("RGB", (64, 96), "white")
    ImageDraw.Draw(receipt).text((4, 40), "TOTAL 9.25", fill="black")
    ball = Image.new("RGB", (150, 100), (30, 60, 200))
    ImageDraw.Draw(ball).ellipse((40, 20, 100, 80), fill=(240, 200, 20))
    return [receipt, ball]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_round_trips_and_generates_a_left_padded_batch(variant):
    processor, model = load(variant)
    assert processor.tokenizer.padding_side == "left"
    texts = [
        processor.apply_chat_template(user_turn("What is the total on this receipt?"), add_generation_prompt=True),
        processor.apply_chat_template(user_turn("Describe the image."), add_generation_prompt=True),
    ]
    inputs = processor(text=texts, images=two_images(), padding=True, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 4], [1, 6, 10]]  # (t, h, w) in 16 px patches
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][1].all()  # the short prompt is padded left

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)

    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape[0] == 2 and new.shape[1] >= 1
    assert (new[:, 0] != processor.tokenizer.pad_token_id).all()  # both rows produced a token of their own


def test_build_is_deterministic_from_the_seed(tmp_path):
    build_tiny_vlm(tmp_path / "a", variant="moe", seed=0)
    build_tiny_vlm(tmp_path / "b", variant="moe", seed=0)
    build_tiny_vlm(tmp_path / "c", variant="moe", seed=1)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_ensure_builds_once_under_a_versioned_name(model_cache):
    path = ensure_tiny_vlm(variant="dense")
    assert path == model_cache / f"tiny-vlm-dense-v{TINY_VLM_VERSION}-seed0"
    assert ensure_tiny_vlm(variant="dense") == path
    assert not list(model_cache.glob(".tiny-vlm-*")), "a staging directory was left behind"
    with pytest.raises(ValueError, match="unknown tiny VLM variant"):
        ensure_tiny_vlm(variant="large")


def test_thinking_template_opens_a_think_block_and_can_close_it_empty():
    processor, _ = load("dense-thinking")
    prompt = processor.apply_chat_template(user_turn("Is this safe?"), add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    off = processor.apply_chat_template(user_turn("Is this safe?"), add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_instruct_template_has_no_think_block():
    processor, _ = load("moe")
    for enable_thinking in (True, False):
        prompt = processor.apply_chat_template(
            user_turn("Is this safe?"), add_generation_prompt=True, enable_thinking=enable_thinking
        )
        assert prompt == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is this safe?<|im_end|>\n" \
                         "<|im_start|>assistant\n"


def test_tokenizer_special_tokens_are_atomic_and_match_the_config():
    processor, model = load("dense")
    tokenizer, config = processor.tokenizer, model.config
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                            "<|video_pad|>", "<think>", "</think>")}
    for token, token_id in ids.items():
        assert tokenizer.encode(f"safe{token}unsafe") == tokenizer.encode("safe") + [token_id] + tokenizer.encode("unsafe")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert config.text_config.vocab_size == len(tokenizer)
    assert (config.image_token_id, config.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (ids["<|vision_start|>"], ids["<|vision_end|>"])
    assert model.generation_config.eos_token_id == ids["<|im_end|>"]
    assert model.generation_config.pad_token_id == ids["<|endoftext|>"]
    # As in Qwen3, think tags are not special: skipping special tokens keeps `</think>` to split an answer at.
    assert tokenizer.decode([ids["</think>"], ids["<|im_end|>"]], skip_special_tokens=True) == "</think>"


def test_moe_variant_routes_among_experts():
    _, model = load("moe-thinking")
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert model.config.model_type == "qwen3_vl_moe"
    assert model.config.text_config.num_experts > model.config.text_config.num_experts_per_tok


def test_pixel_budget_bounds_the_image_grid():
    from engine.settings import Settings
    from engine.vlm.chat import pixel_budget

    processor, _ = load("dense")
    text = processor.apply_chat_template(user_turn("Read it."), add_generation_prompt=True)
    budget = pixel_budget(Settings(vlm_min_pixels=1024, vlm_max_pixels=8192))  # the kwargs the VLM pass calls with
    small = processor(text=[text], images=[two_images()[1]], return_tensors="pt", **budget)
    assert small["image_grid_thw"].tolist() == [[1, 4, 6]]  # 24 patches ≤ 8192 px / 16²; 6 image tokens


@pytest.mark.parametrize("variant", ["dense", "moe-thinking"])
def test_xgrammar_constrains_the_tiny_model_to_valid_json(variant):
    import xgrammar as xgr

    processor, model = load(variant)
    info = xgr.TokenizerInfo.from_huggingface(processor.tokenizer, vocab_size=model.config.text_config.vocab_size)
    # Without any_whitespace=False a random model emits whitespace until max_new_tokens and never closes the JSON.
    grammar = xgr.GrammarCompiler(info).compile_json_schema(INVOICE_SCHEMA, any_whitespace=False)
    texts = [
        processor.apply_chat_template(user_turn(q), add_generation_prompt=True, enable_thinking=False)
        for q in ("Extract the total and the date as JSON.", "Return JSON.")
    ]
    inputs = processor(text=texts, images=two_images(), padding=True, return_tensors="pt")

    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=64, do_sample=False, logits_processor=[xgr.contrib.hf.LogitsProcessor(grammar)]
        )

    for row in out[:, inputs["input_ids"].shape[1] :]:
        assert processor.tokenizer.eos_token_id in row.tolist(), "the JSON did not close within max_new_tokens"
        answer = processor.tokenizer.decode(row, skip_special_tokens=True)
        # strict=False: xgrammar 0.2.8's maxLength strings admit raw control characters, which strict JSON forbids.
        jsonschema.validate(json.loads(answer, strict=False), INVOICE_SCHEMA)
