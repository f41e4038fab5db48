"""The VLM engine and its tasks on the tiny Qwen3-VL models: batching, reasoning split, constrained answers, and the
per-row tasks (vqa's questions, parse's Markdown) on the dense and the MoE Thinking model."""

from __future__ import annotations

import json
import pickle

import jsonschema
import pytest
from PIL import Image

from engine.hub import ModelError
from engine.settings import load_settings
from engine.vlm.chat import resolve_vlm
from engine.vlm.constrained import GrammarCompiler
from engine.vlm.model import VLM
from engine.vlm.tasks import make_task
from engine.vlm.tasks.base import RowRequest, TaskError

# Its own bounds fit the tiny preset's 128 answer tokens at up to 4 bytes a character (engine/vlm_tasks/extract.py).
SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "maxLength": 6},
        "total": {"type": "number"},
        "paid": {"type": "boolean"},
        "lines": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["vendor", "total"],
}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (96, 96), "white"), Image.new("RGB", (40, 120), "blue")]


def sized(images, **row) -> list[RowRequest]:
    """One request per image, of its size, each with the same `row` fields (question, categories)."""
    return [RowRequest(image.width, image.height, **row) for image in images]


def _run(vlm: VLM, task, images, requests: list[RowRequest] | None = None):
    """The task over a batch as a pass runs it: per-row instructions and grammars; its rows and the raw outputs."""
    requests = requests or sized(images)
    task.prepare(vlm)
    grammars = [task.grammar(r) for r in requests]
    compiler = GrammarCompiler(vlm.processor.tokenizer, vlm.vocab_size)
    factory = compiler.processor_factory(grammars) if grammars[0] is not None else None
    outputs = vlm.generate(images, [task.instruction(r) for r in requests], factory, task.wants_first_logits)
    return [task.parse(o, r) for o, r in zip(outputs, requests, strict=True)], outputs


def test_a_batch_of_differently_sized_images_gets_one_answer_each(dense, images):
    outputs = dense.generate(images, "Describe the image.")
    assert len(outputs) == 3 and all(o.num_output_tokens > 0 and o.reasoning is None for o in outputs)
    assert not dense.thinks


def test_thinking_models_split_reasoning_from_the_answer_within_budget(thinking, images):
    assert thinking.thinks and thinking.chat_prompt("x").endswith("<think>\n")
    outputs = thinking.generate(images[:2], "Read the text.")
    for output in outputs:
        assert output.reasoning and "</think>" not in output.answer
        budget = thinking.settings.vlm_thinking_budget + 1 + thinking.settings.vlm_max_new_tokens + 1
        assert output.num_output_tokens <= budget


def test_thinking_can_be_switched_off_or_given_no_budget(images):
    off = VLM("tiny-thinking", load_settings("tiny", overrides={"enable_thinking": False}))
    assert not off.thinks and off.generate(images[:1], "x")[0].reasoning is None
    no_budget = VLM("tiny-thinking", load_settings("tiny", overrides={"vlm_thinking_budget": 0}))
    assert no_budget.thinks and no_budget.generate(images[:1], "x")[0].reasoning is None


@pytest.mark.parametrize("model", ["dense", "thinking"])
def test_extraction_always_parses_and_validates(request, model, images, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    task = make_task("extract", load_settings("tiny"), schema_file)
    rows, _ = _run(request.getfixturevalue(model), task, images)
    for row in rows:
        jsonschema.validate(json.loads(row["fields"]), SCHEMA)
        assert isinstance(row["vendor"], str) and isinstance(row["total"], float)
    assert str(task.columns.field("lines").type) == "list<item: string>"


def test_moderation_answers_only_in_the_policy_with_a_probability(dense, images, tmp_path):
    rows, _ = _run(dense, make_task("moderate", load_settings("tiny")), images)
    codes = {f"S{i}" for i in range(1, 14)}
    for row in rows:
        assert set(row["categories"]) <= codes and 0.0 <= row["score"] <= 1.0
        assert row["safe"] == (not row["categories"]) or not row["safe"]
    policy = tmp_path / "policy.yaml"
    policy.write_text("categories:\n  - {code: X1, name: Spam}\n  - {code: X2, name: Gore}\n")
    rows, _ = _run(dense, make_task("moderate", load_settings("tiny"), policy_file=policy), images)
    assert all(set(r["categories"]) <= {"X1", "X2"} for r in rows)


def test_prompts_can_be_overridden_in_settings():
    request = RowRequest(64, 48)
    task = make_task("ocr", load_settings("tiny", overrides={"ocr_prompt": "Transcribe."}))
    assert task.instruction(request) == "Transcribe."
    assert "S13: Elections." in make_task("moderate", load_settings("tiny")).instruction(request)


@pytest.mark.parametrize("model", ["dense", "thinking"])
def test_vqa_asks_each_row_its_own_question_else_the_task_wide_one(request, model, images):
    vlm = request.getfixturevalue(model)
    task = make_task("vqa", load_settings("tiny"), question="What colour is it?")
    requests = [RowRequest(64, 48, question="How many shapes?"), RowRequest(96, 96), RowRequest(40, 120, question=" ")]
    assert [task.instruction(r) for r in requests] == ["How many shapes?"] + ["What colour is it?"] * 2
    rows, outputs = _run(vlm, task, images, requests)
    assert len(rows) == 3 and all(isinstance(r["answer"], str) and r["answer"] == r["answer"].strip() for r in rows)
    assert all(bool(o.reasoning) == vlm.thinks for o in outputs)  # the Thinking model reasoned before answering
    assert task.columns.names == ["answer"] and task.accepts_video


def test_vqa_rows_with_different_questions_in_one_batch_get_one_answer_each(dense, images):
    task = make_task("vqa", load_settings("tiny"))
    task.check_input(["image", "question"])  # the column is enough without --question
    questions = ["Is it red?", "What shape is shown?", "Describe the colour in one word."]
    requests = [RowRequest(image.width, image.height, question=q) for image, q in zip(images, questions)]
    rows, outputs = _run(dense, task, images, requests)
    assert len(rows) == len(outputs) == 3 and all(o.num_output_tokens > 0 for o in outputs)


def test_vqa_prompt_override_wraps_the_question_and_must_place_it():
    task = make_task("vqa", load_settings("tiny", overrides={"vqa_prompt": "Answer in one word. {question}"}))
    assert task.instruction(RowRequest(8, 8, question="Colour?")) == "Answer in one word. Colour?"
    with pytest.raises(TaskError, match="must contain {question}"):
        make_task("vqa", load_settings("tiny", overrides={"vqa_prompt": "Answer in one word."}))


def test_vqa_without_any_question_is_refused_before_running_and_per_row():
    task = make_task("vqa", load_settings("tiny"))
    with pytest.raises(TaskError, match="vqa needs a 'question' column or --question TEXT"):
        task.check_input(["image"])
    with pytest.raises(ValueError, match="no question"):  # a row of the column whose cell is empty
        task.instruction(RowRequest(8, 8, question=None))
    make_task("vqa", load_settings("tiny"), question="Why?").check_input(["image"])
    with pytest.raises(TaskError, match="--question is empty"):
        make_task("vqa", load_settings("tiny"), question="  ")


@pytest.mark.parametrize("model", ["dense", "thinking"])
def test_parse_writes_each_page_as_markdown(request, model, images):
    vlm = request.getfixturevalue(model)
    task = make_task("parse", load_settings("tiny"))
    assert task.instruction(RowRequest(64, 48)) == "qwenvl markdown" and not task.accepts_video
    rows, outputs = _run(vlm, task, images)
    assert [list(r) for r in rows] == [["markdown"]] * 3 and task.columns.names == ["markdown"]
    assert all(r["markdown"] == o.answer.strip() for r, o in zip(rows, outputs))
    assert all(bool(o.reasoning) == vlm.thinks for o in outputs)
    custom = make_task("parse", load_settings("tiny", overrides={"parse_prompt": "qwenvl html"}))
    assert custom.instruction(RowRequest(64, 48)) == "qwenvl html"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"type": "object", "properties": {"a": {"type": "strng"}}}', "not a valid JSON Schema"),
        ('{"type": "array", "items": {"type": "string"}}', "must be an object with at least one property"),
        (json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1000)}}), "1000 properties"),
        ('{"type": "object", "properties": {"error": {"type": "string"}}}', "clash with output columns"),
    ],
)
def test_bad_schemas_are_refused_before_anything_runs(tmp_path, content, message):
    path = tmp_path / "schema.json"
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        make_task("extract", load_settings("tiny"), path)


def test_bad_policy_files_are_refused(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("categories:\n  - {code: S1, name: A}\n  - {code: S1, name: B}\n")
    with pytest.raises(TaskError, match="unique"):
        make_task("moderate", load_settings("tiny"), policy_file=path)


def test_a_vlm_directory_with_only_pickles_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelError, match="only pickles: pytorch_model.bin"):
        resolve_vlm(str(tmp_path))
