"""Grounding: Qwen3-VL's relative boxes in pixels, each row's categories, and a grammar whose longest answer fits the
token budget, measured against xgrammar and run on the tiny dense and MoE Thinking models."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from PIL import Image

from engine.settings import load_settings
from engine.vlm.chat import VLMOutput
from engine.vlm.constrained import GrammarCompiler
from engine.vlm.tasks import make_task
from engine.vlm.tasks.base import RowRequest, TaskError
from engine.vlm.tasks.detect import max_boxes, relative_to_pixels, split_categories

BUDGET = load_settings("tiny").vlm_max_new_tokens  # 128 tokens


def detector(budget: int = BUDGET, categories: str | None = None, **overrides):
    return make_task("detect", load_settings("tiny", overrides={"vlm_max_new_tokens": budget, **overrides}),
                     categories=categories)  # fmt: skip


def admits(info: xgr.TokenizerInfo, task, request: RowRequest, answer: str) -> bool:
    """Whether the row's grammar admits `answer` whole, followed by the stop token."""
    m = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(task.grammar(request).parsed()))
    return m.accept_string(answer) and m.accept_token(info.stop_token_ids[0])


@pytest.mark.parametrize(
    "bbox, size, pixels",
    [
        ([0, 0, 1000, 1000], (640, 480), (0, 0, 640, 480)),  # the full frame
        ([100, 250, 500, 750], (300, 1200), (30, 300, 150, 900)),  # relative, not square: x by width, y by height
        ([500, 750, 100, 250], (300, 1200), (30, 300, 150, 900)),  # corners swapped
        ([-20, 200, 1300, 1000.5], (640, 480), (0, 96, 640, 480)),  # outside the image: clamped
    ],
)
def test_relative_boxes_become_ordered_pixels_within_the_image(bbox, size, pixels):
    assert relative_to_pixels(bbox, *size) == pytest.approx(pixels, abs=1e-9)


def test_categories_are_split_and_a_rows_own_win_over_the_task_wide_ones():
    assert split_categories(" cat, dog,,cat ,  , red car") == ["cat", "dog", "red car"]
    task = detector(categories="cat, dog")
    assert task.labels(RowRequest(8, 8, categories="car,, car")) == ["car"]
    assert task.labels(RowRequest(8, 8)) == task.labels(RowRequest(8, 8, categories=" , ")) == ["cat", "dog"]
    assert task.instruction(RowRequest(8, 8)) == (
        'Locate every instance that belongs to the following categories: "cat, dog". '
        "Report bbox coordinates in JSON format."
    )
    custom = detector(categories="cat", detect_prompt="Find: {categories}.")
    assert custom.instruction(RowRequest(8, 8, categories="a,b")) == "Find: a, b."
    assert task.columns.names == ["boxes"] and not task.accepts_video


def test_no_categories_anywhere_is_refused_before_running_and_per_row():
    task = detector()
    with pytest.raises(TaskError, match="detect needs a 'categories' column or --categories"):
        task.check_input(["image"])
    task.check_input(["image", "categories"])
    detector(categories="cat").check_input(["image"])
    for ask in (task.instruction, task.grammar):
        with pytest.raises(ValueError, match="no categories"):
            ask(RowRequest(8, 8))
    with pytest.raises(TaskError, match="names no category"):
        detector(categories=", ,")
    with pytest.raises(TaskError, match="must contain {categories}"):
        detector(detect_prompt="Find everything.")


def test_a_budget_without_room_for_one_box_is_refused():
    one_box = len('[{"bbox_2d": [1000, 1000, 1000, 1000], "label": "x"}]')
    with pytest.raises(TaskError, match=f"takes up to {one_box} tokens"):
        detector(budget=one_box - 1)
    assert max_boxes(["x"], one_box) == 1
    with pytest.raises(TaskError, match="raise vlm_max_new_tokens"):  # --categories too long for the budget
        detector(categories="x" * BUDGET)
    with pytest.raises(ValueError, match="raise vlm_max_new_tokens"):  # a row's own, at the row
        detector().grammar(RowRequest(8, 8, categories="x" * BUDGET))


@pytest.mark.parametrize("budget", [BUDGET, 512])
def test_the_longest_answer_is_admitted_fits_the_budget_and_one_more_box_does_not(info, budget):
    task, request = detector(budget), RowRequest(8, 8, categories="cat,traffic light")
    boxes = max_boxes(["cat", "traffic light"], budget)
    longest = [{"bbox_2d": [1000] * 4, "label": "traffic light"}] * boxes
    assert boxes >= 1 and admits(info, task, request, json.dumps(longest))
    # Every token spells a byte or more, so the answer's bytes bound its tokens.
    assert len(json.dumps(longest)) <= budget < len(json.dumps(longest + longest[:1]))
    assert not admits(info, task, request, json.dumps(longest + longest[:1]))  # maxItems stops it
    assert admits(info, task, request, "[]")  # nothing found is an answer


def test_xgrammar_writes_boxes_as_the_bound_counts_them(info):
    """What max_boxes assumes of the installed xgrammar: a space after each comma and colon and no other whitespace,
    integers 0..1000 without leading zeros, keys in order, only the row's labels, written raw."""
    task, request = detector(512), RowRequest(8, 8, categories="cat,dög")
    assert admits(info, task, request, '[{"bbox_2d": [0, 12, 999, 1000], "label": "cat"}, '
                                       '{"bbox_2d": [1, 2, 3, 4], "label": "dög"}]')  # fmt: skip
    for answer in ['[{"bbox_2d":[0,0,1,1],"label":"cat"}]', '[ {"bbox_2d": [0, 0, 1, 1], "label": "cat"}]',
                   '[{"bbox_2d": [00, 0, 1, 1], "label": "cat"}]', '[{"bbox_2d": [0, 0, 1001, 1], "label": "cat"}]',
                   '[{"bbox_2d": [0, 0, 1.5, 1], "label": "cat"}]', '[{"bbox_2d": [0, 0, 1], "label": "cat"}]',
                   '[{"label": "cat", "bbox_2d": [0, 0, 1, 1]}]', '[{"bbox_2d": [0, 0, 1, 1], "label": "dog"}]',
                   '[{"bbox_2d": [0, 0, 1, 1], "label": "d\\u00f6g"}]']:  # fmt: skip
        assert not admits(info, task, request, answer), answer


def test_unusable_answers_are_row_errors_and_an_empty_list_is_no_boxes():
    task, request = detector(categories="cat"), RowRequest(640, 480)

    def parse(answer: str) -> dict:
        return task.parse(VLMOutput(answer, None, 1, None), request)

    assert parse("[]") == {"boxes": []}
    assert parse('[{"bbox_2d": [0, 0, 500, 1000], "label": "cat"}]') == {
        "boxes": [{"label": "cat", "x1": 0.0, "y1": 0.0, "x2": 320.0, "y2": 480.0}]
    }
    for answer, reason in [('[{"bbox_2d": [0, 0', "not complete JSON; raise vlm_max_new_tokens"),
                           ('{"bbox_2d": [0, 0, 1, 1]}', "not a JSON list"), ('[{"bbox_2d": [0, 0, 1]}]', "box 0"),
                           ('[{"bbox_2d": [0, 0, 1, 1], "label": "dog"}]', "not one of")]:  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            parse(answer)


@pytest.mark.parametrize("model", ["dense", "thinking"])
def test_boxes_of_a_batch_with_per_row_categories_always_parse_and_lie_within_each_image(request, model):
    vlm = request.getfixturevalue(model)
    task = make_task("detect", vlm.settings, categories="person")  # the budget the model answers in
    sizes = [(64, 48), (300, 1200), (96, 96), (1200, 90), (40, 120)]
    categories = ["cat, dog", "red car,bus", None, "dög,cat,tree", "a"]
    images = [Image.new("RGB", size, colour) for size, colour in zip(sizes, ["red", "white", "blue", "green", "gray"])]
    rows = [RowRequest(w, h, categories=c) for (w, h), c in zip(sizes, categories)]
    compiler = GrammarCompiler(vlm.processor.tokenizer, vlm.vocab_size)
    factory = compiler.processor_factory([task.grammar(r) for r in rows])
    outputs = vlm.generate(images, [task.instruction(r) for r in rows], factory)
    assert all(bool(o.reasoning) == vlm.thinks for o in outputs)
    found = 0
    for output, row in zip(outputs, rows, strict=True):
        boxes = task.parse(output, row)["boxes"]  # raises ValueError for an answer that does not parse
        found += len(boxes)
        for box in boxes:
            assert box["label"] in task.labels(row)
            assert 0 <= box["x1"] <= box["x2"] <= row.width and 0 <= box["y1"] <= box["y2"] <= row.height
    assert found > 0  # the checks above ran on real boxes, not only on empty answers
