"""OCR: all the text of an image, in reading order."""

from __future__ import annotations

import pyarrow as pa

from engine.settings import Settings
from engine.vlm.chat import VLMOutput
from engine.vlm.tasks.base import RowRequest, VLMTask

PROMPT = (
    "Read all the text in this image. Write it out exactly as it appears, in natural reading order "
    "(top to bottom, left to right; columns one after another), keeping line breaks. Write nothing else."
)


class OCRTask(VLMTask):
    name = "ocr"
    accepts_video = True
    columns = pa.schema([("text", pa.string())])

    def __init__(self, settings: Settings):
        self.prompt = settings.ocr_prompt or PROMPT

    def parse(self, output: VLMOutput, request: RowRequest) -> dict:
        return {"text": output.answer.strip()}
