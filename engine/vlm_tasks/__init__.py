"""The VLM tasks, one file each: what to ask, how the answer is constrained, and which columns it becomes.

A task has `name`, `columns` (its output columns as a pyarrow schema), `instruction` (the prompt, overridable in
settings as `<task>_prompt`), `grammar` (an xgrammar grammar for the answer, or None), `wants_first_logits`, and
`parse(output) -> dict` (raises ValueError when an answer is unusable: the row gets that error).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from engine.settings import Settings

TASKS = ("ocr", "extract", "moderate", "caption")


class TaskError(ValueError):
    """A task cannot be set up (bad schema file, bad policy file); nothing runs."""


class VLMTask:
    """Defaults for the parts a task may leave out: no grammar, no logits, nothing to prepare per model."""

    name: str
    columns: pa.Schema
    instruction: str
    grammar = None
    wants_first_logits = False

    def prepare(self, vlm) -> None:
        """Look up what the task needs from the loaded model (token ids); called once per model actor."""

    def parse(self, output) -> dict:
        raise NotImplementedError


def make_task(name: str, settings: Settings, schema_file: str | Path | None = None, policy_file: str | Path | None = None):
    from engine.vlm_tasks import caption, extract, moderate, ocr

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
    raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
