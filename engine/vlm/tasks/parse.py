"""Document parsing: a whole page as Markdown, asked with Qwen3-VL's own document-parsing prompt."""

from __future__ import annotations

import pyarrow as pa

from engine.settings import Settings
from engine.vlm.chat import VLMOutput
from engine.vlm.tasks.base import RowRequest, VLMTask

PROMPT = "qwenvl markdown"  # the cookbook's prompt: Qwen3-VL was trained to answer it with the page as Markdown


class ParseTask(VLMTask):
    name = "parse"
    columns = pa.schema([("markdown", pa.string())])

    def __init__(self, settings: Settings):
        self.prompt = settings.parse_prompt or PROMPT

    def parse(self, output: VLMOutput, request: RowRequest) -> dict:
        return {"markdown": output.answer.strip()}
