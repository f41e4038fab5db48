"""The VLM tasks, one file each: what to ask, how the answer is constrained, and which columns it becomes.

A task has `name`, `columns` (its output columns as a pyarrow schema), and per row (a `RowRequest`):
`instruction(request)` (the prompt, overridable in settings as `<task>_prompt`), `grammar(request)` (an xgrammar
grammar for the answer, or None) and `parse(output, request) -> dict`. `instruction` and `parse` raise ValueError
when a row cannot be asked or its answer is unusable: that row gets the error, the others are answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from engine.settings import Settings

TASKS = ("ocr", "extract", "moderate", "caption", "vqa", "detect", "parse")


class TaskError(ValueError):
    """A task cannot be set up (bad schema file, bad policy file, no question); nothing runs."""


@dataclass(frozen=True)
class RowRequest:
    """What a task may use of one row: its own question and categories (None: the row has none), and the size in
    pixels of what it shows, upright (EXIF orientation applied; a rendered PDF page; a video frame)."""

    width: int
    height: int
    question: str | None = None
    categories: str | None = None  # comma-separated, as the `categories` column holds them
    is_video: bool = False


class VLMTask:
    """Defaults for the parts a task may leave out: no grammar, no logits, images only, nothing to prepare."""

    name: str
    columns: pa.Schema
    wants_first_logits = False
    accepts_video = False
    prompt: str  # the instruction, where it is the same for every row

    def prepare(self, vlm) -> None:
        """Look up what the task needs from the loaded model (token ids); called once per model actor."""

    def check_input(self, column_names: list[str]) -> None:
        """Refuse, before anything runs, an input that can never be asked (e.g. vqa with no question anywhere)."""

    def instruction(self, request: RowRequest) -> str:
        return self.prompt

    def grammar(self, request: RowRequest):
        return None

    def parse(self, output, request: RowRequest) -> dict:
        raise NotImplementedError


def make_task(
    name: str,
    settings: Settings,
    schema_file: str | Path | None = None,
    policy_file: str | Path | None = None,
    question: str | None = None,
    categories: str | None = None,
) -> VLMTask:
    from engine.vlm.tasks import caption, detect, extract, moderate, ocr, parse, vqa

    if name == "ocr":
        return ocr.OCRTask(settings)
    if name == "caption":
        return caption.CaptionTask(settings)
    if name == "extract":
        if schema_file is None:
            raise TaskError("extract needs --schema FILE.json")
        return extract.ExtractTask(settings, extract.load_schema(schema_file))
    if name == "moderate":
        return moderate.ModerationTask(settings, moderate.load_policy(policy_file))
    if name == "vqa":
        return vqa.VQATask(settings, question)
    if name == "detect":
        return detect.DetectTask(settings, categories)
    if name == "parse":
        return parse.ParseTask(settings)
    raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
