"""Content moderation as Llama Guard 3 Vision does it: a policy of hazard categories, a first line "safe" or
"unsafe", a second line of violated category codes, and a score = the probability of "unsafe" at the verdict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
import yaml

from engine.settings import Settings
from engine.vlm.chat import VLMOutput
from engine.vlm.constrained import Grammar
from engine.vlm.tasks.base import RowRequest, TaskError, VLMTask

# The 13 MLCommons hazard categories, as Llama Guard 3 Vision names them.
DEFAULT_POLICY = [
    ("S1", "Violent Crimes"), ("S2", "Non-Violent Crimes"), ("S3", "Sex-Related Crimes"),
    ("S4", "Child Sexual Exploitation"), ("S5", "Defamation"), ("S6", "Specialized Advice"), ("S7", "Privacy"),
    ("S8", "Intellectual Property"), ("S9", "Indiscriminate Weapons"), ("S10", "Hate"),
    ("S11", "Suicide & Self-Harm"), ("S12", "Sexual Content"), ("S13", "Elections"),
]  # fmt: skip

PROMPT = """Task: Check if there is unsafe content in this image according to our safety policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
{categories}
<END UNSAFE CONTENT CATEGORIES>

Provide your safety assessment for the image:
- First line must read 'safe' or 'unsafe'.
- If unsafe, a second line must include a comma-separated list of violated categories."""


@dataclass(frozen=True)
class Category:
    code: str
    name: str
    description: str = ""


def load_policy(path: str | Path | None) -> list[Category]:
    """The default policy, or a YAML/JSON file: `categories: [{code, name, description?}, ...]`."""
    if path is None:
        return [Category(code, name) for code, name in DEFAULT_POLICY]
    try:
        data = yaml.safe_load(Path(path).read_text())
        entries = data["categories"] if isinstance(data, dict) else data
        policy = [Category(str(e["code"]), str(e["name"]), str(e.get("description", ""))) for e in entries]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise TaskError(f"{path}: not a policy file of categories with code and name ({type(err).__name__}: {err})") from None
    codes = [c.code for c in policy]
    if not policy or len(set(codes)) != len(codes) or not all(c.replace("_", "").isalnum() for c in codes):
        raise TaskError(f"{path}: category codes must be unique, alphanumeric and at least one")
    return policy


class ModerationTask(VLMTask):
    name = "moderate"
    wants_first_logits = True
    accepts_video = True
    columns = pa.schema([("safe", pa.bool_()), ("categories", pa.list_(pa.string())), ("score", pa.float64())])

    def __init__(self, settings: Settings, policy: list[Category]):
        self.policy = policy
        listing = "\n".join(f"{c.code}: {c.name}." + (f" {c.description}" if c.description else "") for c in policy)
        self.prompt = (settings.moderate_prompt or PROMPT).replace("{categories}", listing)
        codes = " | ".join(json.dumps(c.code) for c in policy)
        self.answer_grammar = Grammar("ebnf", f'root ::= "safe" | "unsafe\\n" code ("," code)*\ncode ::= {codes}\n')
        self.verdict_ids: tuple[int, int] | None = None

    def prepare(self, vlm) -> None:
        encode = vlm.processor.tokenizer.encode
        # "safe" and "unsafe" differ in their first character, so their first tokens always differ.
        self.verdict_ids = (encode("safe", add_special_tokens=False)[0], encode("unsafe", add_special_tokens=False)[0])

    def grammar(self, request: RowRequest) -> Grammar:
        return self.answer_grammar

    def parse(self, output: VLMOutput, request: RowRequest) -> dict:
        lines = output.answer.strip().split("\n")
        verdict = lines[0].strip()
        if verdict not in ("safe", "unsafe"):
            raise ValueError(f"the verdict is {verdict!r}, not 'safe' or 'unsafe'")
        known = {c.code for c in self.policy}
        found = [c.strip() for c in lines[1].split(",")] if verdict == "unsafe" and len(lines) > 1 else []
        categories = list(dict.fromkeys(c for c in found if c in known))
        safe_logit, unsafe_logit = output.first_answer_logits[list(self.verdict_ids)]
        score = torch.softmax(torch.stack([safe_logit, unsafe_logit]), dim=0)[1].item()
        return {"safe": verdict == "safe", "categories": categories, "score": score}
