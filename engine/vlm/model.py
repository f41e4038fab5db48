"""A Qwen3-VL-family model through transformers: loading, and batched generation of one answer per image.

Thinking models generate in two phases (engine/vlm/chat.py); the cost of the split here: the second phase prefills
the prompt again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.library_logging import quiet_libraries
from engine.media.video import Video
from engine.settings import Settings
from engine.vlm.chat import ChatModel, Visual, VLMOutput, pixel_budget, resolve_vlm, until
from engine.vlm.constrained import Grammar, GrammarCompiler


class VLM(ChatModel):
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
        self._read_chat_tokens()
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[-1]
        self._grammars: GrammarCompiler | None = None

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

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

    def generate_constrained(
        self,
        images: Sequence[Visual],
        instructions: str | Sequence[str],
        grammars: Sequence[Grammar | None] | None = None,
        want_first_logits: bool = False,
    ) -> list[VLMOutput]:
        """generate() with the answers' grammars (one per row, all or none), compiled once each for this model: the
        call both engines answer alike (engine/vlm/vllm_engine.py)."""
        processor = None
        if grammars is not None and grammars[0] is not None:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.processor.tokenizer, self.vocab_size)
            processor = self._grammars.processor_factory(list(grammars))
        return self.generate(images, instructions, processor, want_first_logits)

    def generate(
        self,
        images: Sequence[Visual],
        instructions: str | Sequence[str],
        answer_processor: Callable[[], object] | None = None,
        want_first_logits: bool = False,
    ) -> list[VLMOutput]:
        """One answer per image or video, each to its own instruction (or one instruction for all);
        `answer_processor()` makes a fresh logits processor (e.g. grammars, one per row) for the answer phase."""
        prompts = self.prompts(images, instructions)
        reasoning: list[str | None] = [None] * len(images)
        reasoning_tokens = [0] * len(images)
        if self.thinks:
            thought = [[] for _ in images]
            if self.settings.vlm_thinking_budget > 0:
                stops = [self.think_end_id, *self.eos_ids]
                _, new = self._generate(prompts, images, self.settings.vlm_thinking_budget, eos_token_id=stops)
                thought = [until(row, stops) for row in new.tolist()]
            prompts, reasoning, reasoning_tokens = self.continue_after_reasoning(prompts, thought)
        extra = {"eos_token_id": self.eos_ids, "output_logits": want_first_logits}
        if answer_processor is not None:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList([answer_processor()])
        out, new = self._generate(prompts, images, self.settings.vlm_max_new_tokens, **extra)
        results = []
        for i, row in enumerate(new.tolist()):
            tokens = until(row, self.eos_ids)
            first = out.logits[0][i].float().cpu() if want_first_logits else None
            # finished: stopped by EOS rather than the token budget
            results.append(self.output(tokens, len(tokens) < len(row), reasoning[i], reasoning_tokens[i], first))
        return results
