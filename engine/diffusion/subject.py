"""One subject to personalise: the manifest row the engine needs, its stable default seed, and the names of what the
engine writes into its folder."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

SUBJECT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# What the engine writes into a subject's folder (RUN/subjects/<id>/, or `python -m engine train --out DIR`).
WEIGHTS = "weights"  # the trained subject, in stock diffusers layouts
CHECKPOINTS = "checkpoints"  # resumable training state
IMAGES = "images"  # generated PNGs
TRAIN_LOG = "train_log.jsonl"  # one line per optimiser step


def stable_seed(text: str) -> int:
    """A seed derived from `text` alone, identical on every machine and Python process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class Subject:
    subject_id: str
    instance_images: tuple[str, ...]
    instance_prompt: str
    class_prompt: str | None = None
    prompts: tuple[str, ...] = ()
    num_images_per_prompt: int | None = None
    seed: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # Each instance photo's own prompt, in `instance_images` order (curation's `instance_prompt, <caption>`);
    # empty: every photo trains with `instance_prompt`
    instance_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Subject ids become directory names: the pattern (no '/', no leading '.') keeps them inside the run.
        if not SUBJECT_ID_PATTERN.fullmatch(self.subject_id):
            raise ValueError(f"invalid subject_id {self.subject_id!r}: must match {SUBJECT_ID_PATTERN.pattern}")
        if self.instance_prompts and len(self.instance_prompts) != len(self.instance_images):
            raise ValueError(f"subject {self.subject_id!r}: {len(self.instance_prompts)} instance prompts for "
                             f"{len(self.instance_images)} instance images")  # fmt: skip

    @property
    def photo_prompts(self) -> tuple[str, ...]:
        """The prompt each instance photo trains with."""
        return self.instance_prompts or (self.instance_prompt,) * len(self.instance_images)

    @property
    def effective_seed(self) -> int:
        return self.seed if self.seed is not None else stable_seed(self.subject_id)
