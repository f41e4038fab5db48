"""Curation's decisions, with no Ray in it: which instance photos a subject trains on, cropped how, and which are
refused and why (RUN/curation.parquet, one row per photo).

A photo is refused when the VLM passes could not read it, or moderation flags it (its verdict, or its score against
`moderation_threshold`). A photo with exactly one instance of the subject's class noun found is cropped to a square
around it with a margin; with none or several it is kept whole, or refused with `curate_unlocated: refuse` (the
reason says which). With `instance_prompt_mode: caption` each photo trains with `instance_prompt, <its caption>`. A
subject left with fewer usable photos than `min_instance_images` fails alone, naming each refused photo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from engine.diffusion.subject import Subject
from engine.settings import Settings
from ray_jobs.state.withheld import is_unsafe

MARGIN = 0.15  # of the box's longer side, on each side of it: the subject whole, with some of its surroundings
BOX = pa.struct([("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.float64()), ("y2", pa.float64())])
SCHEMA = pa.schema([
    ("subject_id", pa.string()), ("image", pa.string()), ("kept", pa.bool_()), ("reason", pa.string()),
    ("box", BOX), ("caption", pa.string()), ("categories", pa.list_(pa.string())),
])  # fmt: skip
ARTICLES = {"a", "an", "the", "some", "my", "our"}


def class_noun(subject: Subject) -> str:
    """The noun curation looks for: the class prompt's last word ("a photo of a dog" → "dog"), else the instance
    prompt's."""
    words = re.findall(r"[A-Za-z][A-Za-z-]*", subject.class_prompt or subject.instance_prompt)
    words = [w for w in words if w.lower() not in ARTICLES]
    return words[-1].lower() if words else "object"


def photo_id(subject_id: str, index: int) -> str:
    return f"{subject_id}/{index}"


def photo_rows(subjects: list[Subject]) -> list[dict[str, Any]]:
    """The curation passes' images manifest: one row per instance photo, its class noun to find."""
    return [
        {"id": photo_id(s.subject_id, k), "image": uri, "categories": class_noun(s), "subject_id": s.subject_id}
        for s in subjects
        for k, uri in enumerate(s.instance_images)
    ]


@dataclass(frozen=True)
class PhotoVerdict:
    """A row of RUN/curation.parquet."""

    subject_id: str
    image: str
    kept: bool
    reason: str
    box: dict[str, float] | None = None  # the one instance found, in pixels of the upright photo
    caption: str | None = None
    categories: tuple[str, ...] = ()  # moderation's codes

    def row(self) -> dict[str, Any]:
        return {**self.__dict__, "categories": list(self.categories)}


def plural(noun: str) -> str:
    """English's regular plural, enough for a reason's "3 boxes found"."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in set("aeiou"):
        return noun[:-1] + "ies"
    return noun + "s"


def photo_prompt(instance_prompt: str, caption: str | None) -> str:
    """What a photo trains with under `instance_prompt_mode: caption`: the instance prompt (its identifier token
    first), then the photo's caption on one line."""
    caption = " ".join((caption or "").split())
    return f"{instance_prompt}, {caption}" if caption else instance_prompt


def judge_photo(subject_id: str, image: str, noun: str, found: dict[str, Any] | None, screened: dict[str, Any] | None,
                settings: Settings, captioned: dict[str, Any] | None = None) -> PhotoVerdict:  # fmt: skip
    """A photo's verdict from its `detect` row (`found`), its `moderate` row (`screened`) and, with
    `instance_prompt_mode: caption`, its `caption` row (`captioned`)."""
    captions = settings.instance_prompt_mode == "caption"
    if found is None or screened is None or (captions and captioned is None):
        return PhotoVerdict(subject_id, image, False, "not curated: no answer from the curation passes")
    answers = [found, screened] + ([captioned] if captions else [])
    if error := next((a["error"] for a in answers if a.get("error")), None):
        return PhotoVerdict(subject_id, image, False, f"unusable: {error}")
    caption = " ".join(captioned["caption"].split()) if captions else None
    codes = tuple(screened.get("categories") or ())
    if is_unsafe(screened.get("safe"), screened.get("score"), None, settings.moderation_threshold):
        listed = ", ".join(codes) or "no category named"
        return PhotoVerdict(subject_id, image, False, f"flagged by moderation ({listed}; score "
                            f"{screened.get('score', 0.0):.2f})", caption=caption, categories=codes)  # fmt: skip
    boxes = [b for b in found.get("boxes") or [] if b.get("label") == noun]
    if len(boxes) == 1:
        box = {k: float(boxes[0][k]) for k in ("x1", "y1", "x2", "y2")}
        side = max(box["x2"] - box["x1"], box["y2"] - box["y1"]) * (1 + 2 * MARGIN)
        if side < settings.min_image_side:  # a crop that small could not be read back for training
            return PhotoVerdict(subject_id, image, True, f"one {noun} found, but a square around it would be "
                                f"{side:.0f} px, under min_image_side ({settings.min_image_side}): kept whole",
                                caption=caption, categories=codes)  # fmt: skip
        return PhotoVerdict(subject_id, image, True, f"one {noun} found: cropped around it", box, caption, codes)
    found_what = f"no {noun} found" if not boxes else f"{len(boxes)} {plural(noun)} found"
    if settings.curate_unlocated == "refuse":
        return PhotoVerdict(subject_id, image, False, f"{found_what}: refused (curate_unlocated: refuse)",
                            caption=caption, categories=codes)  # fmt: skip
    return PhotoVerdict(subject_id, image, True, f"{found_what}: kept whole", caption=caption, categories=codes)


def square_crop(width: int, height: int, box: dict[str, float], margin: float = MARGIN) -> tuple[int, int, int, int]:
    """A square (left, top, right, bottom) around `box` with `margin` of its longer side on each side, moved (not
    shrunk) to stay inside the photo, and never larger than the photo's shorter side."""
    side = max(box["x2"] - box["x1"], box["y2"] - box["y1"]) * (1 + 2 * margin)
    side = int(round(min(max(side, 1.0), width, height)))
    cx, cy = (box["x1"] + box["x2"]) / 2, (box["y1"] + box["y2"]) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side


def usable_or_reason(subject: Subject, verdicts: list[PhotoVerdict], settings: Settings) -> str | None:
    """None when the subject has enough usable photos, else why it fails: the count and every refused photo."""
    kept = sum(v.kept for v in verdicts)
    if kept >= settings.min_instance_images:
        return None
    refused = "; ".join(f"{v.image}: {v.reason}" for v in verdicts if not v.kept)
    return (f"curation left {kept} usable photo(s) of {len(verdicts)}, fewer than min_instance_images "
            f"({settings.min_instance_images}); refused: {refused}")  # fmt: skip
