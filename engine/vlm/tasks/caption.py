"""Captions: a detailed description of an image."""

from __future__ import annotations

import pyarrow as pa

from engine.settings import Settings
from engine.vlm.chat import VLMOutput
from engine.vlm.tasks.base import RowRequest, VLMTask

PROMPT = (
    "Describe this image in detail: the main subject, its appearance, the setting, colours, lighting and "
    "composition, and any text visible in it. Write one paragraph."
)


class CaptionTask(VLMTask):
    name = "caption"
    accepts_video = True
    columns = pa.schema([("caption", pa.string())])

    def __init__(self, settings: Settings):
        self.prompt = settings.caption_prompt or PROMPT

    def parse(self, output: VLMOutput, request: RowRequest) -> dict:
        return {"caption": output.answer.strip()}
