"""What every VLM task is made of: the `VLMTask` defaults, the `RowRequest` a task sees of one row, and `TaskError`.
Task modules import this; the registry (this package's __init__) imports the task modules."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


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
