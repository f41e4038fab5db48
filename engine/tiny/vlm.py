"""The `tiny` vision-language models: small random Qwen3-VL models (dense and MoE; Instruct and Thinking chat
templates) with a tokenizer, processor and chat template built locally, so VLM passes run offline through the same
`AutoProcessor` / `AutoModelForImageTextToText.from_pretrained` path as real Qwen3-VL weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.library_logging import quiet_libraries
from engine.tiny.common import build_once, default_cache_dir

# Bump when the architecture, tokenizer, template or construction changes, so stale caches are rebuilt.
TINY_VLM_VERSION = 1
VARIANTS = ("dense", "moe", "dense-thinking", "moe-thinking")

# Qwen3-VL's vision geometry: 16 px patches, 2×2 patches merged into one LLM token, 2 frames per temporal patch.
# One image token therefore covers a 32×32 px square.
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Small defaults (4 to 64 image tokens) so CPU tests stay fast; callers set their own budget per call.
DEFAULT_MIN_PIXELS = 4 * (PATCH_SIZE * MERGE_SIZE) ** 2
DEFAULT_MAX_PIXELS = 64 * (PATCH_SIZE * MERGE_SIZE) ** 2

# Qwen's special tokens, in Qwen's relative order. `<think>`/`</think>` are added tokens but, as in Qwen3, not
# "special": `decode(..., skip_special_tokens=True)` keeps `</think>`, so callers can split a Thinking answer at it.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
THINK_TOKENS = ("<think>", "</think>")
# A cap, not a target: the fixed corpus runs out of pairs to merge at 1277 tokens (1286 with the added ones).
BPE_VOCAB_SIZE = 2048

# The Qwen3-VL chat template, trimmed of tool calling. With `thinking` set, the generation prompt opens a think
# block (Qwen3-VL-Thinking: the model's output has no opening tag, only `</think>`), and `enable_thinking=False`
# closes it empty instead (Qwen3's switch). Past assistant turns keep only the text after their last `</think>`.
_CHAT_TEMPLATE = """\
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\\n' -}}
{%- if message['content'] is string -%}
{%- set text = message['content'] -%}
{%- else -%}
{%- set text = namespace(value='') -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}
{%- set image_count.value = image_count.value + 1 -%}
{%- if add_vision_id %}{% set text.value = text.value + 'Picture ' + image_count.value|string + ': ' %}{% endif -%}
{%- set text.value = text.value + '<|vision_start|><|image_pad|><|vision_end|>' -%}
{%- elif item['type'] == 'video' or 'video' in item -%}
{%- set video_count.value = video_count.value + 1 -%}
{%- if add_vision_id %}{% set text.value = text.value + 'Video ' + video_count.value|string + ': ' %}{% endif -%}
{%- set text.value = text.value + '<|vision_start|><|video_pad|><|vision_end|>' -%}
{%- elif 'text' in item -%}
{%- set text.value = text.value + item['text'] -%}
{%- endif -%}
{%- endfor -%}
{%- set text = text.value -%}
{%- endif -%}
{%- if THINKING and message['role'] == 'assistant' and '</think>' in text -%}
{%- set text = text.split('</think>')[-1].lstrip('\\n') -%}
{%- endif -%}
{{- text + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- if THINKING -%}
{%- if enable_thinking is defined and enable_thinking is false -%}
{{- '<think>\\n\\n</think>\\n\\n' -}}
{%- else -%}
{{- '<think>\\n' -}}
{%- endif -%}
{%- endif -%}
{%- endif -%}
"""


def chat_template(thinking: bool) -> str:
    """The Jinja chat template of an Instruct (`thinking=False`) or Thinking variant."""
    return _CHAT_TEMPLATE.replace("THINKING", "true" if thinking else "false")


def _corpus() -> list[str]:
    """A fixed English corpus of what the VLM passes read and write: captions, OCR text, moderation verdicts, JSON."""
    sentences = [
        "A photo of a dog sitting on the grass in a sunny park.",
        "A yellow ball on a blue background.",
        "The image shows a red car parked next to a white building.",
        "A close-up of a cat with green eyes looking at the camera.",
        "Two people are walking along the beach at sunset.",
        "A plate of food with rice, vegetables and a piece of chicken.",
        "There is a tree, a house and a fence in the picture.",
        "The text in the image reads: OPEN 24 HOURS.",
        "A man wearing a black jacket is holding a phone.",
        "A woman in a red dress stands in front of a door.",
        "The photo is blurry and the colors are dark.",
        "This image is safe. It contains no violence, no weapons and no adult content.",
        "This image is unsafe because it shows a weapon.",
        "safe", "unsafe", "unsafe\nS1", "unsafe\nS9,S10", "safe\n",
        "S1 Violent Crimes. S2 Non-Violent Crimes. S3 Sex-Related Crimes. S4 Child Sexual Exploitation.",
        "S5 Defamation. S6 Specialized Advice. S7 Privacy. S8 Intellectual Property. S9 Indiscriminate Weapons.",
        "S10 Hate. S11 Suicide & Self-Harm. S12 Sexual Content. S13 Elections.",
        "INVOICE Invoice number: INV-2024-0042 Date: 2024-03-15 Due date: 2024-04-14",
        "Bill to: Acme Corporation, 123 Main Street, Springfield, CA 90210, USA",
        "Description Quantity Unit price Amount",
        "Subtotal: $1,250.00 Tax (8%): $100.00 Total: $1,350.00",
        "Thank you for your business! Payment is due within 30 days.",
        "Receipt #5581 Store 17 Cashier: Anna 2 x Coffee 3.50 1 x Bagel 2.25 TOTAL 9.25 CASH 10.00 CHANGE 0.75",
        '{"total": 1350.0, "date": "2024-03-15", "currency": "USD", "vendor": "Acme"}',
        '{"label": "safe", "categories": [], "score": 0.02}',
        '{"label": "unsafe", "categories": ["S1", "S10"], "score": 0.97}',
        '{"caption": "a dog on the grass", "objects": ["dog", "grass", "tree"]}',
        '[{"bbox_2d": [120, 48, 560, 912], "label": "person"}, {"bbox_2d": [0, 0, 1000, 1000], "label": "sky"}]',
        '{"items": [{"name": "Coffee", "qty": 2, "price": 3.5}, {"name": "Bagel", "qty": 1, "price": 2.25}]}',
        "Question: What is the total amount on the invoice? Answer: The total is 1350.00 dollars.",
        "Question: What is written on the sign? Answer: The sign says STOP.",
        "Describe the image in one sentence. Extract the invoice fields as JSON.",
        "Is this image safe or unsafe? Answer with safe or unsafe, then list the violated categories.",
        "Let me look at the image carefully. First, I see the header. Then I check the date and the total.",
        "Hmm, the number is hard to read, but it looks like 42. So the answer is 42.",
        "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>/\\|-_+=*&^%$#@~`",
        "January February March April May June July August September October November December",
        "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
        "zero one two three four five six seven eight nine ten hundred thousand million",
    ]
    # Figures in the shapes receipts and invoices print them, generated by a fixed rule rather than sampled.
    figures = [
        f"Item {i}: {i * 37 % 100}.{i * 13 % 100:02d} date 20{10 + i % 15}-{1 + i % 12:02d}-{1 + i * 7 % 28:02d}"
        f' {{"total": {i * 211 % 5000}.{i % 100:02d}, "date": "2024-{1 + i % 12:02d}-{1 + i % 28:02d}"}}'
        for i in range(200)
    ]
    return sentences * 4 + figures


def build_tokenizer(thinking: bool = False):
    """A byte-level BPE trained on the fixed corpus, with Qwen's special tokens, left padding and chat template."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    # Added after training so they follow the learned vocabulary in Qwen's order, and split out whole before BPE.
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS),
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template(thinking)
    return tokenizer


def build_processor(tokenizer):
    """A Qwen3VLProcessor around `tokenizer`, with Qwen3-VL's image/video geometry and small default budgets."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    geometry = dict(patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE)
    normalize = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # Qwen3-VL's, not CLIP's
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": DEFAULT_MAX_PIXELS}, **geometry, **normalize
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": 4 * DEFAULT_MAX_PIXELS}, **geometry, **normalize
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def build_config(tokenizer, moe: bool):
    """A two-layer Qwen3-VL (or Qwen3-VL-MoE) config whose vocabulary and vision token ids match `tokenizer`."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        # mrope_section splits head_dim / 2 rotary frequencies between time, height and width, as [24, 20, 20] does
        # for Qwen3-VL's head_dim 128.
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        dtype="float32",
    )
    if moe:
        # Every layer sparse, 2 of 4 experts per token; the MoE text config ties embeddings by default, the real
        # Qwen3-VL-30B-A3B does not.
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    tie_word_embeddings=False)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        out_hidden_size=64,
        num_position_embeddings=64,  # an 8×8 grid of learned positions, interpolated to each image's grid
        deepstack_visual_indexes=[0, 1],  # one deepstack merger per vision block, fed to the two text layers
    )
    config_class = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_generation_config(tokenizer, thinking: bool):
    """Stop at `<|im_end|>`, pad with `<|endoftext|>`; sampling defaults as Qwen3-VL ships them (pass
    `do_sample=False` for greedy decoding, as a caller of the real models must too)."""
    from transformers import GenerationConfig

    sampling = dict(top_p=0.95, top_k=20, temperature=0.6) if thinking else dict(top_p=0.8, top_k=20, temperature=0.7)
    return GenerationConfig(
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        do_sample=True,
        **sampling,
    )


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny VLM variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def build_tiny_vlm(path: Path, variant: str = "dense", seed: int = 0) -> None:
    """Write a tiny Qwen3-VL directory (model, processor, tokenizer, chat template) at `path`, deterministic in `seed`."""
    from transformers import (
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeForConditionalGeneration,
    )

    _check_variant(variant)
    quiet_libraries()
    moe, thinking = variant.startswith("moe"), variant.endswith("-thinking")
    tokenizer = build_tokenizer(thinking)
    config = build_config(tokenizer, moe)
    model_class = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):  # seed the weights without resetting the caller's random stream
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = build_generation_config(tokenizer, thinking)
    model.save_pretrained(path, safe_serialization=True)
    build_processor(tokenizer).save_pretrained(path)


def ensure_tiny_vlm(cache_dir: Path | None = None, variant: str = "dense", seed: int = 0) -> Path:
    """The tiny VLM directory in the cache, built on first use."""
    _check_variant(variant)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(root / f"tiny-vlm-{variant}-v{TINY_VLM_VERSION}-seed{seed}", "config.json",
                      lambda staging: build_tiny_vlm(staging, variant=variant, seed=seed))  # fmt: skip
