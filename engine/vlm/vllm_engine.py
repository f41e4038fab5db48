"""A Qwen3-VL-family model through vLLM: the same answers as engine/vlm/model.py's transformers engine, from an
inference engine that batches continuously (the engine of large VLM passes on GPUs).

Prompts (the model's own chat template), the Thinking split and budget, the grammars and the parsing are the
transformers engine's; only decoding moves into vLLM. Grammars go to vLLM's structured outputs (xgrammar) as the
EBNF the tasks' checks already parsed, so both engines enforce the same language.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.library_logging import quiet_libraries
from engine.media.video import Video
from engine.settings import Settings
from engine.vlm.chat import ChatModel, Visual, VLMOutput, pixel_budget, resolve_vlm, until
from engine.vlm.constrained import Grammar

# The verdict scores of moderation need the raw log-probabilities of two tokens at the answer's first position.
# vLLM returns the top ones, after the grammar's mask: 20 (vLLM's default ceiling) holds every token a grammar lets
# open an answer with for the tasks here ("s", "sa", ..., "unsafe" for moderation).
FIRST_LOGPROBS = 20
TEXT_TOKENS = 4096  # room for the instruction and chat framing beside the visual tokens (extract's schema included)


def max_model_len(settings: Settings, model_limit: int) -> int:
    """The longest sequence a row can make: its visual tokens (one per 32×32 px; a video's frames pair up in time,
    and each pair carries a timestamp), the text, the reasoning and the answer. Capped by the model's own limit.
    vLLM sizes its KV cache and checks every prompt against this instead of the model's 256k default."""
    image_tokens = settings.vlm_max_pixels // (32 * 32)
    video_tokens = settings.video_max_pixels // (32 * 32) // 2 + settings.video_max_frames * 8
    budget = max(image_tokens, video_tokens) + TEXT_TOKENS + settings.vlm_thinking_budget + settings.vlm_max_new_tokens
    return min(budget, model_limit)


class VLLMEngine(ChatModel):
    """The transformers engine's interface (`name`, `processor`, `thinks`, `chat_prompt`, `generate_constrained`)
    on a `vllm.LLM`. One per model actor: it holds the model for the actor's life."""

    def __init__(self, name: str, settings: Settings):
        from transformers import AutoConfig, AutoProcessor
        from vllm import LLM

        quiet_libraries()
        self.name = name
        self.settings = settings
        self.path = resolve_vlm(name)
        trust = settings.trust_remote_code
        # The processor gives the prompts their chat template and the tasks their token ids, as on transformers.
        self.processor = AutoProcessor.from_pretrained(self.path, trust_remote_code=trust)
        self._read_chat_tokens()
        config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust)
        text_config = getattr(config, "text_config", config)
        dtype = settings.vlm_dtype
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        args = dict(
            model=str(self.path),
            dtype=dtype,
            trust_remote_code=trust,
            seed=0,
            tensor_parallel_size=settings.vlm_tensor_parallel_size,
            max_model_len=max_model_len(settings, text_config.max_position_embeddings),
            limit_mm_per_prompt={"image": 1, "video": 1},  # one image, page or video per row
            mm_processor_kwargs=pixel_budget(settings),
            # Free whitespace off engine-wide (vLLM ignores the per-request flag): the tasks' grammars arrive as EBNF
            # without it already; this keeps any JSON schema vLLM compiles itself as tight.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            generation_config="vllm",  # greedy is asked per request; the model's sampling defaults stay out
        )
        self.llm = LLM(**(args | settings.vlm_engine_args))  # the user's engine arguments win

    def close(self) -> None:
        """Stop vLLM's engine processes now, rather than whenever this object is collected (their memory with them)."""
        self.llm.llm_engine.engine_core.shutdown()

    def _request(self, prompt: str, visual: Visual) -> dict:
        if isinstance(visual, Video):
            # The frames come sampled (engine/video.py): their source indices and fps give Qwen3-VL its timestamps.
            metadata = {"total_num_frames": len(visual.frame_indices), "fps": visual.fps,
                        "frames_indices": list(visual.frame_indices), "width": visual.width,
                        "height": visual.height, "do_sample_frames": False}  # fmt: skip
            return {"prompt": prompt, "multi_modal_data": {"video": (visual.frames, metadata)}}
        return {"prompt": prompt, "multi_modal_data": {"image": visual}}

    def _generate(self, prompts: list[str], visuals: Sequence[Visual], params: list) -> list:
        """vLLM's output per row, or the exception that row alone raised: vLLM refuses a whole call for one bad
        request (e.g. longer than max_model_len), so a refused batch is asked again row by row."""
        requests = [self._request(p, v) for p, v in zip(prompts, visuals, strict=True)]
        if not requests:
            return []
        try:
            return self.llm.generate(requests, params, use_tqdm=False)
        except Exception:
            if len(requests) == 1:
                raise
        outputs = []
        for request, param in zip(requests, params):
            try:
                outputs.extend(self.llm.generate([request], [param], use_tqdm=False))
            except Exception as err:
                outputs.append(err)
        return outputs

    def _params(self, max_tokens: int, stops: list[int], grammar: Grammar | None = None, logprobs: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = None
        if grammar is not None:
            # The EBNF xgrammar wrote from a JSON schema, or the task's own: the language the transformers engine
            # enforces, whitespace included.
            source = grammar.source if grammar.kind == "ebnf" else str(grammar.parsed())
            structured = StructuredOutputsParams(grammar=source)
        return SamplingParams(
            temperature=0.0, max_tokens=max_tokens, stop_token_ids=stops, skip_special_tokens=False,
            structured_outputs=structured, logprobs=FIRST_LOGPROBS if logprobs else None, detokenize=False,
        )  # fmt: skip

    def _first_logits(self, logprobs: list | None) -> torch.Tensor:
        """A vocabulary-sized row of the answer's first log-probabilities (−inf where vLLM returned none): a softmax
        over any two of them equals one over the raw logits, the normaliser cancelling."""
        row = torch.full((len(self.processor.tokenizer),), float("-inf"))
        for token, entry in (logprobs[0] if logprobs else {}).items():
            if token < row.shape[0]:
                row[token] = entry.logprob
        return row

    def generate_constrained(
        self,
        images: Sequence[Visual],
        instructions: str | Sequence[str],
        grammars: Sequence[Grammar | None] | None = None,
        want_first_logits: bool = False,
    ) -> list[VLMOutput]:
        """One answer per image or video, each to its own instruction (or one for all), its answer constrained by
        its grammar (None: free)."""
        grammars = list(grammars) if grammars is not None else [None] * len(images)
        prompts = self.prompts(images, instructions)
        reasoning: list[str | None] = [None] * len(images)
        reasoning_tokens = [0] * len(images)
        failed: dict[int, Exception] = {}
        if self.thinks:
            thought: list[list[int]] = [[] for _ in images]
            if self.settings.vlm_thinking_budget > 0:
                stops = [self.think_end_id, *self.eos_ids]
                params = [self._params(self.settings.vlm_thinking_budget, stops)] * len(images)
                for i, out in enumerate(self._generate(prompts, images, params)):
                    if isinstance(out, Exception):
                        failed[i] = out
                    else:
                        thought[i] = until(out.outputs[0].token_ids, stops)
            prompts, reasoning, reasoning_tokens = self.continue_after_reasoning(prompts, thought)
        limit = self.settings.vlm_max_new_tokens
        params = [self._params(limit, self.eos_ids, g, want_first_logits) for g in grammars]
        asked = [i for i in range(len(images)) if i not in failed]  # a row refused while reasoning is not asked again
        answered = self._generate([prompts[i] for i in asked], [images[i] for i in asked], [params[i] for i in asked])
        outputs: dict[int, object] = dict(failed) | dict(zip(asked, answered))
        results = []
        for i in range(len(images)):
            output = outputs[i]
            if isinstance(output, Exception):
                results.append(VLMOutput("", None, 0, None, error=f"{type(output).__name__}: {output}"))
                continue
            generated = output.outputs[0]
            first = self._first_logits(generated.logprobs) if want_first_logits else None
            finished = generated.finish_reason == "stop"  # stopped by EOS rather than the token budget
            tokens = until(generated.token_ids, self.eos_ids)
            results.append(self.output(tokens, finished, reasoning[i], reasoning_tokens[i], first))
        return results
