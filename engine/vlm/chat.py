"""What the two VLM engines share: the model's chat template, the Thinking split and how a row's answer is read
from its generated tokens. engine/vlm/model.py decodes with transformers, engine/vlm/vllm_engine.py with vLLM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from engine.hub import resolve_transformers_model
from engine.media.video import Video
from engine.settings import Settings
from engine.tiny import registry

THINK_END = "</think>"

Visual = Image.Image | Video  # what one row shows the model


@dataclass
class VLMOutput:
    answer: str
    reasoning: str | None  # None unless a Thinking model reasoned
    num_output_tokens: int  # reasoning and answer tokens together
    first_answer_logits: torch.Tensor | None  # raw logits at the answer's first position (for verdict scores)
    error: str | None = None  # why this row alone got no answer (the vLLM engine answers the others)


def resolve_vlm(name: str, cache_dir: Path | None = None) -> Path:
    """The local directory of `name`: a `tiny` variant (built offline), a local directory, or a hub id."""
    if name in registry.VLMS:
        return registry.VLMS[name](cache_dir)
    return resolve_transformers_model(name, extra_patterns=["*.jinja"])


def pixel_budget(settings: Settings) -> dict:
    """Qwen3-VL's processor takes its pixel budgets as each processor's `size`: per image, and per video for all its
    frames together. Frames arrive sampled already (engine/video.py), so the processor samples none itself."""
    return {
        "images_kwargs": {"size": {"shortest_edge": settings.vlm_min_pixels, "longest_edge": settings.vlm_max_pixels}},
        "videos_kwargs": {"size": {"shortest_edge": settings.vlm_min_pixels, "longest_edge": settings.video_max_pixels},
                          "do_sample_frames": False, "cap_pixels_per_frame": True},
    }  # fmt: skip


def until(tokens: Sequence[int], stops: Sequence[int]) -> list[int]:
    """A row's generated tokens up to (not including) its first stop token."""
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return list(tokens[:end])


class ChatModel:
    """The half of an engine that is the model's own text: prompts from its chat template, and Thinking models'
    two phases (reasoning, stopped at `</think>` or `vlm_thinking_budget` tokens, then the answer from the prompt
    plus the reasoning plus `</think>`), which makes the budget exact and lets a grammar constrain the answer alone."""

    settings: Settings
    processor: object

    def _read_chat_tokens(self) -> None:
        tokenizer = self.processor.tokenizer
        self.eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.think_end_id = tokenizer.convert_tokens_to_ids(THINK_END) if THINK_END in tokenizer.get_vocab() else None
        self.thinks = self.chat_prompt("x").rstrip().endswith("<think>")

    def chat_prompt(self, instruction: str, video: bool = False) -> str:
        visual = {"type": "video" if video else "image"}
        messages = [{"role": "user", "content": [visual, {"type": "text", "text": instruction}]}]
        extra = {} if self.settings.enable_thinking is None else {"enable_thinking": self.settings.enable_thinking}
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)

    def prompts(self, visuals: Sequence[Visual], instructions: str | Sequence[str]) -> list[str]:
        """One prompt per image or video, each with its own instruction (or one instruction for all)."""
        if isinstance(instructions, str):
            instructions = [instructions] * len(visuals)
        return [self.chat_prompt(text, isinstance(v, Video)) for v, text in zip(visuals, instructions, strict=True)]

    def continue_after_reasoning(
        self, prompts: list[str], thought: list[list[int]]
    ) -> tuple[list[str], list[str | None], list[int]]:
        """The answer phase's prompts, each row's reasoning text, and its reasoning tokens (+ the closing tag)."""
        tokenizer = self.processor.tokenizer
        reasoning = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in thought]
        # The reasoning goes back in as text, without special tokens: a vision token a model emitted there would read
        # as one more image placeholder in the prompt.
        answer_prompts = [p + tokenizer.decode(t, skip_special_tokens=True) + f"{THINK_END}\n\n"
                          for p, t in zip(prompts, thought, strict=True)]  # fmt: skip
        return answer_prompts, reasoning, [len(t) + 1 for t in thought]

    def output(
        self, tokens: list[int], finished: bool, reasoning: str | None, reasoning_tokens: int,
        first_answer_logits: torch.Tensor | None,
    ) -> VLMOutput:  # fmt: skip
        """One row's answer from its answer-phase tokens (up to EOS; `finished`: stopped by EOS, not the budget)."""
        tokenizer = self.processor.tokenizer
        answer_tokens = tokens
        if self.thinks and self.think_end_id in tokens:
            # The answer is what follows the last </think>; anything before it was more reasoning.
            last = len(tokens) - 1 - tokens[::-1].index(self.think_end_id)
            more = tokenizer.decode(tokens[:last], skip_special_tokens=True).strip()
            reasoning = f"{reasoning}\n{more}".strip() if reasoning else more
            answer_tokens = tokens[last + 1 :]
        return VLMOutput(
            answer=tokenizer.decode(answer_tokens, skip_special_tokens=True),
            reasoning=reasoning or None,
            num_output_tokens=reasoning_tokens + len(tokens) + int(finished),
            first_answer_logits=first_answer_logits,
        )
