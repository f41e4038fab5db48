"""Class-prior images: generated once per (base model, class prompt, resolution, count, sampler) and shared.

A set lives in its own folder under the cache root. Images are written one by one as they are made, each from its
own seed, so an interrupted set resumes where it stopped and ends up identical; `manifest.json`, written last,
marks the set complete.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass

from engine import storage
from engine.diffusion.base_model import BaseModel
from engine.diffusion.generation import generate
from engine.diffusion.subject import stable_seed
from engine.settings import Settings

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ClassImageSet:
    key: str
    uris: list[str]
    generated: int  # images made by this call; 0 means the whole set came from the cache


def class_set_key(base_fingerprint: str, class_prompt: str, settings: Settings) -> str:
    """Folder name of a class set: readable prefix, then a hash of everything that decides its pixels."""
    identity = "|".join(
        str(v)
        for v in (
            base_fingerprint,
            class_prompt,
            settings.resolution,
            settings.num_class_images,
            settings.num_inference_steps,
            settings.guidance_scale,
            settings.scheduler,  # the UNet bases' sampler; a FLUX base's own FlowMatch Euler is fixed by its fingerprint
            settings.negative_prompt,
            # text sequence length: FLUX's prompt encoding (none on UNet bases, whose keys stay as they were)
            *([settings.max_sequence_length] if settings.max_sequence_length is not None else []),
        )
    )
    slug = re.sub(r"[^A-Za-z0-9]+", "-", class_prompt).strip("-").lower()[:40] or "class"
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


class ClassImageCache:
    """Class-image sets under one root (e.g. RUN/class_images), shared by every subject with the same key."""

    def __init__(self, root: str):
        self.root = root

    def lookup(self, key: str) -> list[str] | None:
        """The complete set's URIs, or None if it is missing or unfinished."""
        manifest_uri = storage.join(self.root, key, MANIFEST)
        if not storage.exists(manifest_uri):
            return None
        return [storage.join(self.root, key, name) for name in storage.read_json(manifest_uri)["images"]]

    def ensure(self, base: BaseModel, class_prompt: str, settings: Settings) -> ClassImageSet:
        """The set for `class_prompt`, generating whatever images are missing with the base model's weights."""
        key = class_set_key(base.fingerprint, class_prompt, settings)
        cached = self.lookup(key)
        if cached is not None:
            return ClassImageSet(key, cached, generated=0)
        folder = storage.join(self.root, key)
        names = [f"{i:05d}.png" for i in range(settings.num_class_images)]
        present = set(storage.listdir(folder))
        missing = [i for i, name in enumerate(names) if name not in present]
        seed = stable_seed(key)
        for start in range(0, len(missing), settings.sample_batch_size):
            chunk = missing[start : start + settings.sample_batch_size]
            images = generate(
                base, [class_prompt] * len(chunk), [seed + i for i in chunk], settings, settings.sample_batch_size
            )
            for i, image in zip(chunk, images):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                storage.write_bytes(storage.join(folder, names[i]), buffer.getvalue())
        storage.write_json(
            storage.join(folder, MANIFEST),
            {"class_prompt": class_prompt, "base_model_fingerprint": base.fingerprint, "images": names},
        )
        return ClassImageSet(key, [storage.join(folder, n) for n in names], generated=len(missing))
