"""Visual question answering: each row's own question, or one question for every row, about its image or video."""

from __future__ import annotations

import pyarrow as pa

from engine.settings import Settings
from engine.vlm.chat import VLMOutput
from engine.vlm.tasks.base import RowRequest, TaskError, VLMTask

PROMPT = "{question}"  # the question as the user wrote it; vqa_prompt may wrap it in instructions


class VQATask(VLMTask):
    name = "vqa"
    accepts_video = True
    columns = pa.schema([("answer", pa.string())])

    def __init__(self, settings: Settings, question: str | None):
        self.prompt = settings.vqa_prompt or PROMPT
        if "{question}" not in self.prompt:
            raise TaskError("vqa_prompt must contain {question}, where each row's question goes")
        if question is not None and not question.strip():
            raise TaskError("--question is empty")
        self.question = question

    def check_input(self, column_names: list[str]) -> None:
        if self.question is None and "question" not in column_names:
            raise TaskError("vqa needs a 'question' column or --question TEXT")

    def instruction(self, request: RowRequest) -> str:
        # A row's own question wins; a null or blank one (as CSV files hold missing values) falls back to --question.
        question = request.question if request.question and request.question.strip() else self.question
        if question is None:
            raise ValueError("no question: the row's 'question' is empty and no --question was given")
        return self.prompt.replace("{question}", question)

    def parse(self, output: VLMOutput, request: RowRequest) -> dict:
        return {"answer": output.answer.strip()}
