"""The registry of VLM tasks (`TASKS`, `make_task`). Each task is one file of this package: what to ask, how the
answer is constrained, and which columns it becomes.

A task (tasks/base.py) has `name`, `columns` (its output columns as a pyarrow schema), and per row (a `RowRequest`):
`instruction(request)` (the prompt, overridable in settings as `<task>_prompt`), `grammar(request)` (an xgrammar
grammar for the answer, or None) and `parse(output, request) -> dict`. `instruction` and `parse` raise ValueError
when a row cannot be asked or its answer is unusable: that row gets the error, the others are answered.
"""

from __future__ import annotations

from pathlib import Path

from engine.settings import Settings
from engine.vlm.tasks import caption, detect, extract, moderate, ocr, parse, vqa
from engine.vlm.tasks.base import TaskError, VLMTask

TASKS = ("ocr", "extract", "moderate", "caption", "vqa", "detect", "parse")


def make_task(
    name: str,
    settings: Settings,
    schema_file: str | Path | None = None,
    policy_file: str | Path | None = None,
    question: str | None = None,
    categories: str | None = None,
) -> VLMTask:
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
