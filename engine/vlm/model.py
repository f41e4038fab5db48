"""A Qwen3-VL-family model through transformers: loading, and batched generation of one answer per image.

Thinking models (whose chat template opens `<think>` itself) generate in two phases: reasoning, stopped at
`</think>` or at `vlm_thinking_budget` tokens, then the answer, from the prompt plus the reasoning plus `</think>`.
The split makes the budget exact and lets a grammar constrain the answer alone. Its cost: the second phase
prefills the prompt again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from engine.hub import resolve_transformers_model
from engine.library_logging import quiet_libraries
from engine.media.video import Video
from engine.settings import Settings
from engine.tiny import registry

THINK_END = "</think>"


@dataclass
class VLMOutput:
    answer: str
    reasoning: str | None  # None unless a Thinking model reasoned
    num_output_tokens: int  # reasoning and answer tokens together
    first_answer_logits: torch.Tensor | None  # raw logits at the answer's first position (for verdict scores)


def resolve_vlm(name: str, cache_dir: Path | None = None) -> Path:
    """The local directory of `name`: a `tiny` variant (built offline), a local directory, or a hub id."""
    if name in registry.VLMS:
        return registry.VLMS[name](cache_dir)
    return resolve_transformers_model(name, extra_patterns=["*.jinja"])


Visual = Image.Image | Video  # what one row shows the model


def pixel_budget(settings: Settings) -> dict:
    """Qwen3-VL's processor takes its pixel budgets as each processor's `size`: per image, and per video for all its
    frames together. Frames arrive sampled already (engine/video.py), so the processor samples none itself."""
    return {
        "images_kwargs": {"size": {"shortest_edge": settings.vlm_min_pixels, "longest_edge": settings.vlm_max_pixels}},
        "videos_kwargs": {"size": {"shortest_edge": settings.vlm_min_pixels, "longest_edge": settings.video_max_pixels},
                          "do_sample_frames": False, "cap_pixels_per_frame": True},
    }  # fmt: skip


class VLM:
    def __init__(self, name: str, settings: Settings, device: str | torch.device | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        quiet_libraries()
        self.name = name
        self.settings = settings
        self.path = resolve_vlm(name)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = settings.vlm_dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        trust = settings.trust_remote_code
        self.processor = AutoProcessor.from_pretrained(self.path, trust_remote_code=trust)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row from its end
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust
        ).to(self.device)
        self.model.eval()
        tokenizer = self.processor.tokenizer
        self.eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[-1]
        self.think_end_id = tokenizer.convert_tokens_to_ids(THINK_END) if THINK_END in tokenizer.get_vocab() else None
        self.thinks = self.chat_prompt("x").rstrip().endswith("<think>")

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def chat_prompt(self, instruction: str, video: bool = False) -> str:
        visual = {"type": "video" if video else "image"}
        messages = [{"role": "user", "content": [visual, {"type": "text", "text": instruction}]}]
        extra = {} if self.settings.enable_thinking is None else {"enable_thinking": self.settings.enable_thinking}
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)

    def _generate(self, prompts: list[str], visuals: Sequence[Visual], max_new_tokens: int, **kwargs):
        # The processor takes a batch's images and videos apart, each list in prompt order.
        images = [v for v in visuals if not isinstance(v, Video)]
        videos = [v for v in visuals if isinstance(v, Video)]
        media: dict = {"images": images} if images else {}
        if videos:
            from transformers.video_utils import VideoMetadata

            media["videos"] = [v.frames for v in videos]
            media["video_metadata"] = [
                VideoMetadata(total_num_frames=len(v.frame_indices), fps=v.fps, frames_indices=v.frame_indices,
                              width=v.width, height=v.height) for v in videos
            ]  # fmt: skip
        inputs = self.processor(
            text=prompts, padding=True, return_tensors="pt", **media, **pixel_budget(self.settings)
        ).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id,
                return_dict_in_generate=True, **kwargs,
            )  # fmt: skip
        return out, out.sequences[:, inputs["input_ids"].shape[1] :]

    def _until(self, tokens: torch.Tensor, stops: list[int]) -> list[list[int]]:
        """Each row's generated tokens up to (not including) its first stop token."""
        rows = []
        for row in tokens.tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            rows.append(row[:end])
        return rows

    def generate(
        self,
        images: Sequence[Visual],
        instructions: str | Sequence[str],
        answer_processor: Callable[[], object] | None = None,
        want_first_logits: bool = False,
    ) -> list[VLMOutput]:
        """One answer per image or video, each to its own instruction (or one instruction for all);
        `answer_processor()` makes a fresh logits processor (e.g. grammars, one per row) for the answer phase."""
        tokenizer = self.processor.tokenizer
        if isinstance(instructions, str):
            instructions = [instructions] * len(images)
        prompts = [self.chat_prompt(text, isinstance(v, Video)) for v, text in zip(images, instructions, strict=True)]
        reasoning: list[str | None] = [None] * len(images)
        reasoning_tokens = [0] * len(images)
        if self.thinks:
            thought = [[] for _ in images]
            if self.settings.vlm_thinking_budget > 0:
                _, new = self._generate(
                    prompts, images, self.settings.vlm_thinking_budget, eos_token_id=[self.think_end_id, *self.eos_ids]
                )
                thought = self._until(new, [self.think_end_id, *self.eos_ids])
            reasoning = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in thought]
            reasoning_tokens = [len(t) + 1 for t in thought]  # + the closing tag
            prompts = [p + tokenizer.decode(t) + f"{THINK_END}\n\n" for p, t in zip(prompts, thought)]
        extra = {"eos_token_id": self.eos_ids, "output_logits": want_first_logits}
        if answer_processor is not None:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList([answer_processor()])
        out, new = self._generate(prompts, images, self.settings.vlm_max_new_tokens, **extra)
        answers = self._until(new, self.eos_ids)
        results = []
        for i, tokens in enumerate(answers):
            finished = len(tokens) < new.shape[1]  # stopped by EOS rather than the token budget
            answer_tokens = tokens
            if self.thinks and self.think_end_id in tokens:
                # The answer is what follows the last </think>; anything before it was more reasoning.
                last = len(tokens) - 1 - tokens[::-1].index(self.think_end_id)
                more = tokenizer.decode(tokens[:last], skip_special_tokens=True).strip()
                reasoning[i] = f"{reasoning[i]}\n{more}".strip() if reasoning[i] else more
                answer_tokens = tokens[last + 1 :]
            results.append(
                VLMOutput(
                    answer=tokenizer.decode(answer_tokens, skip_special_tokens=True),
                    reasoning=reasoning[i] or None,
                    num_output_tokens=reasoning_tokens[i] + len(tokens) + int(finished),
                    first_answer_logits=out.logits[0][i].float().cpu() if want_first_logits else None,
                )
            )
        return results
