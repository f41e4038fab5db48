"""Grounding: a box around every instance of the row's categories, as Qwen3-VL reports it (0-1000 relative
coordinates), constrained to those labels and returned in pixels of the upright original."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

from engine.settings import Settings
from engine.vlm.chat import VLMOutput
from engine.vlm.constrained import Grammar
from engine.vlm.tasks.base import RowRequest, TaskError, VLMTask
from engine.vlm.tasks.extract import literal_bytes

# The Qwen3-VL cookbook's grounding prompt.
PROMPT = (
    'Locate every instance that belongs to the following categories: "{categories}". '
    "Report bbox coordinates in JSON format."
)
SCALE = 1000  # Qwen3-VL's coordinates run from 0 to 1000 across the image, whatever its size
BOXES = pa.list_(pa.struct([("label", pa.string())] + [(k, pa.float64()) for k in ("x1", "y1", "x2", "y2")]))

# A Grammar("json_schema") answer has no free whitespace but a space after each comma and colon, as json.dumps
# writes them (tests/engine/test_detect.py measures it). With one token per byte, the worst case of a byte-level
# tokenizer (engine/vlm_tasks/extract.py), the longest answer of n boxes is n * (box + ", ") - ", " + "[]" bytes.
SEPARATOR = len(", ")
BRACKETS = len("[]")
BOX_BYTES = len(json.dumps({"bbox_2d": [SCALE] * 4, "label": ""})) - len('""')  # with the label's bytes left out


def split_categories(text: str | None) -> list[str]:
    """The labels of a comma-separated list: stripped, the empty ones dropped, each once, in order."""
    return list(dict.fromkeys(label.strip() for label in (text or "").split(",") if label.strip()))


def max_boxes(labels: list[str], max_tokens: int) -> int:
    """The most boxes whose answer fits `max_tokens` tokens, every box at the longest label and coordinates."""
    box = BOX_BYTES + max(map(literal_bytes, labels))
    return (max_tokens - BRACKETS + SEPARATOR) // (box + SEPARATOR)


def relative_to_pixels(bbox_2d: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """A Qwen3-VL box (x1, y1, x2, y2 relative, 0-1000) in pixels of a width x height image: clamped to the image,
    corners ordered so that x1 <= x2 and y1 <= y2."""
    x1, y1, x2, y2 = (min(max(v, 0), SCALE) for v in bbox_2d)
    # Multiply before dividing: 100 * 300 / 1000 is 30.0 exactly, 100 / 1000 * 300 is not.
    xs = sorted((x1 * width / SCALE, x2 * width / SCALE))
    ys = sorted((y1 * height / SCALE, y2 * height / SCALE))
    return xs[0], ys[0], xs[1], ys[1]


class DetectTask(VLMTask):
    name = "detect"
    columns = pa.schema([("boxes", BOXES)])

    def __init__(self, settings: Settings, categories: str | None):
        self.prompt = settings.detect_prompt or PROMPT
        if "{categories}" not in self.prompt:
            raise TaskError("detect_prompt must contain {categories}, where each row's labels go")
        self.categories = split_categories(categories)
        if categories is not None and not self.categories:
            raise TaskError(f"--categories {categories!r} names no category")
        self.max_tokens = settings.vlm_max_new_tokens
        shortest = self.categories or ["x"]  # without --categories, a row's labels are at least one character
        if max_boxes(shortest, self.max_tokens) < 1:
            raise TaskError(self._no_room(shortest))

    def _no_room(self, labels: list[str]) -> str:
        needed = BRACKETS + BOX_BYTES + max(map(literal_bytes, labels))
        return f"one box of {labels} takes up to {needed} tokens; raise vlm_max_new_tokens ({self.max_tokens})"

    def check_input(self, column_names: list[str]) -> None:
        if not self.categories and "categories" not in column_names:
            raise TaskError("detect needs a 'categories' column or --categories LABEL,LABEL")

    def labels(self, request: RowRequest) -> list[str]:
        """The row's own categories, else --categories (a null or blank cell has none); ValueError when there are
        none, or when not even one box of them fits the answer budget."""
        labels = split_categories(request.categories) or self.categories
        if not labels:
            raise ValueError("no categories: the row's 'categories' is empty and no --categories was given")
        if max_boxes(labels, self.max_tokens) < 1:
            raise ValueError(self._no_room(labels))
        return labels

    def instruction(self, request: RowRequest) -> str:
        return self.prompt.replace("{categories}", ", ".join(self.labels(request)))

    def grammar(self, request: RowRequest) -> Grammar:
        labels = self.labels(request)
        coordinate = {"type": "integer", "minimum": 0, "maximum": SCALE}
        box = {
            "type": "object",
            "properties": {"bbox_2d": {"type": "array", "items": coordinate, "minItems": 4, "maxItems": 4},
                           "label": {"enum": labels}},
            "required": ["bbox_2d", "label"],
            "additionalProperties": False,
        }  # fmt: skip
        schema = {"type": "array", "items": box, "maxItems": max_boxes(labels, self.max_tokens)}
        return Grammar("json_schema", json.dumps(schema))

    def parse(self, output: VLMOutput, request: RowRequest) -> dict:
        labels = self.labels(request)
        try:
            answer = json.loads(output.answer)
        except json.JSONDecodeError:
            raise ValueError("the answer is not complete JSON; raise vlm_max_new_tokens") from None
        if not isinstance(answer, list):
            raise ValueError("the answer is not a JSON list of boxes")
        boxes = []
        for i, item in enumerate(answer):
            bbox = item.get("bbox_2d") if isinstance(item, dict) else None
            # type(), not isinstance(): a JSON true is a bool, an int to isinstance, and no coordinate
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(type(v) in (int, float) for v in bbox):
                raise ValueError(f"box {i} has no bbox_2d of 4 numbers")
            if item.get("label") not in labels:
                raise ValueError(f"box {i} is labelled {item.get('label')!r}, not one of {labels}")
            x1, y1, x2, y2 = relative_to_pixels(bbox, request.width, request.height)
            boxes.append({"label": item["label"], "x1": x1, "y1": y1, "x2": x2, "y2": y2})
        return {"boxes": boxes}
