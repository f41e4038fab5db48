"""Prompts longer than a base model's text encoders read: how many tokens each of its tokenizers cuts, so a run can
say so instead of silently training or rendering on the start of the prompt."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3")  # diffusers' names, one per text encoder
UNBOUNDED = 1_000_000  # transformers' stand-in for "no limit" is ~1e30: such a tokenizer's limit is the pipeline's


def base_tokenizers(base_path: Path) -> dict[str, PreTrainedTokenizerBase]:
    """The tokenizers of a diffusers base model folder that have a limit of their own (CLIP's 77 tokens)."""
    found = {}
    for name in TOKENIZER_FOLDERS:
        if (Path(base_path) / name).is_dir():
            tokenizer = AutoTokenizer.from_pretrained(Path(base_path) / name)  # local files, no remote code
            if tokenizer.model_max_length < UNBOUNDED:
                found[name] = tokenizer
    return found


def cut_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[int, int]:
    """(tokens the prompt has, special tokens included; how many of them the encoder never sees)."""
    count = len(tokenizer(prompt, truncation=False)["input_ids"])
    return count, max(0, count - tokenizer.model_max_length)


def prompt_warnings(tokenizers: dict[str, PreTrainedTokenizerBase], prompts: dict[str, str]) -> list[str]:
    """A warning for each prompt (named by its column) that a tokenizer cuts, saying how much."""
    warnings = []
    for column, prompt in prompts.items():
        for name, tokenizer in tokenizers.items():
            count, cut = cut_tokens(tokenizer, prompt)
            if cut:
                encoder = "its text encoder" if len(tokenizers) == 1 else f"the text encoder of {name}"
                warnings.append(f"{column} is {count} tokens long, over the {tokenizer.model_max_length} {encoder} "
                                f"reads: its last {cut} tokens are cut")  # fmt: skip
    return warnings
