"""Subject and prompt fidelity of generated images, measured as the DreamBooth paper does (Ruiz et al., §4.1).

- `dino`: mean cosine between the generated image's DINO embedding (the ViT's [CLS] token; the paper uses ViT-S/16,
  facebook/dino-vits16) and each real photo of the subject's. Self-supervised features keep what tells one
  instance from another of its class, so this is the paper's main subject-fidelity figure.
- `clip_i`: the same with CLIP's projected image embeddings (openai/clip-vit-large-patch14).
- `clip_t`: cosine between the prompt's CLIP text embedding and the image's CLIP embedding (prompt fidelity).
- PRES: the mean `dino` of generations from the bare class prompt ("a photo of a dog"); lower means the class was
  not taken over by the subject (the paper's prior-preservation ablation).
- `diversity`: 1 - mean pairwise cosine within a set of generations. The paper's DIV uses LPIPS, whose network
  weights would have to be downloaded; DINO embeddings are at hand and move the same way.

Models load through transformers from safetensors only; `tiny` builds small random ones offline
(engine/tiny_eval_models.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from engine.hub import default_device, resolve_transformers_model
from engine.library_logging import quiet_libraries
from engine.tiny import registry


def resolve_eval_model(name: str, kind: str, cache_dir: Path | None = None) -> Path:
    """The local directory of evaluation model `name` of `kind` ("dino" or "clip"): `tiny` is built offline."""
    if name == "tiny":
        return registry.EVAL_MODELS[kind](cache_dir)
    return resolve_transformers_model(name)


@dataclass
class Embeddings:
    """L2-normalised embeddings of N images, one row each."""

    dino: torch.Tensor  # [N, D]
    clip: torch.Tensor  # [N, E], in CLIP's joint image-text space


@dataclass
class ImageScores:
    dino: float
    clip_i: float
    clip_t: float


class Evaluator:
    """The two evaluation models, loaded once; embeds images and prompts in batches and scores them."""

    def __init__(self, dino_model: str = "tiny", clip_model: str = "tiny", device: str | torch.device | None = None):
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

        quiet_libraries()
        self.dino_model, self.clip_model = dino_model, clip_model
        self.device = torch.device(device) if device is not None else default_device()
        dino_path, clip_path = resolve_eval_model(dino_model, "dino"), resolve_eval_model(clip_model, "clip")
        # trust_remote_code stays off: both are stock transformers architectures.
        self.dino = AutoModel.from_pretrained(dino_path, use_safetensors=True).to(self.device).eval()
        self.dino_processor = AutoImageProcessor.from_pretrained(dino_path)
        self.clip = CLIPModel.from_pretrained(clip_path, use_safetensors=True).to(self.device).eval()
        self.clip_processor = AutoProcessor.from_pretrained(clip_path)

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> Embeddings:
        dino_pixels = self.dino_processor(images=list(images), return_tensors="pt")["pixel_values"]
        cls = self.dino(pixel_values=dino_pixels.to(self.device)).last_hidden_state[:, 0]
        clip_pixels = self.clip_processor(images=list(images), return_tensors="pt")["pixel_values"]
        projected = self.clip.get_image_features(pixel_values=clip_pixels.to(self.device)).pooler_output
        return Embeddings(F.normalize(cls.float(), dim=-1).cpu(), F.normalize(projected.float(), dim=-1).cpu())

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.clip_processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        projected = self.clip.get_text_features(**tokens.to(self.device)).pooler_output
        return F.normalize(projected.float(), dim=-1).cpu()

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str],
              references: Sequence[Embeddings]) -> list[ImageScores]:  # fmt: skip
        """Each image's scores against its own subject's photos (`references[i]`) and its own prompt."""
        distinct = list(dict.fromkeys(prompts))  # a batch is mostly one prompt's images: embed each prompt once
        seen, said = self.image_embeddings(images), self.text_embeddings(distinct)
        row = {prompt: k for k, prompt in enumerate(distinct)}
        return [
            ImageScores(
                dino=float((seen.dino[i] @ ref.dino.T).mean()),
                clip_i=float((seen.clip[i] @ ref.clip.T).mean()),
                clip_t=float(seen.clip[i] @ said[row[prompts[i]]]),
            )
            for i, ref in enumerate(references)
        ]


def diversity(embeddings: torch.Tensor) -> float:
    """1 - mean cosine over distinct pairs of the (normalised) rows; 0 when fewer than two."""
    count = embeddings.shape[0]
    if count < 2:
        return 0.0
    similarity = embeddings @ embeddings.T
    off_diagonal = similarity.sum() - similarity.diagonal().sum()
    return float(1 - off_diagonal / (count * (count - 1)))
