"""What a base family (UNet: SD 1.x/2.x and SDXL; FLUX.1; FLUX.2 [klein]) contributes to the shared training loop,
packing, export and generation: its text encoding, latent layout, objective and guidance input. Nothing else differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from engine.diffusion.base_model import BaseModel
from engine.settings import Settings


@dataclass
class PromptEmbeddings:
    """What the denoiser is conditioned on by a batch of prompts: per-token hidden states and, where the family has
    one, a pooled embedding (SDXL: text_encoder_2's projection; FLUX.1: CLIP's pooled output)."""

    hidden: torch.Tensor  # [n, tokens, width]
    pooled: torch.Tensor | None = None  # [n, width]; None where the family has none

    def split(self) -> list[PromptEmbeddings]:
        """One PromptEmbeddings per prompt of the batch."""
        pooled = self.pooled.split(1) if self.pooled is not None else [None] * self.hidden.shape[0]
        return [PromptEmbeddings(h, p) for h, p in zip(self.hidden.split(1), pooled)]

    def select(self, rows: torch.Tensor) -> PromptEmbeddings:
        """The rows at indices `rows` (a row may be picked more than once)."""
        rows = rows.to(self.hidden.device)
        return PromptEmbeddings(self.hidden[rows], self.pooled[rows] if self.pooled is not None else None)

    def expand(self, n: int) -> PromptEmbeddings:
        """One prompt's embeddings as n rows (views, not copies): one per sample conditioned on it."""
        pooled = self.pooled.expand(n, -1) if self.pooled is not None else None
        return PromptEmbeddings(self.hidden.expand(n, -1, -1), pooled)

    @staticmethod
    def cat(parts: Sequence[PromptEmbeddings]) -> PromptEmbeddings:
        pooled = [p.pooled for p in parts]
        hidden = torch.cat([p.hidden for p in parts])
        return PromptEmbeddings(hidden, torch.cat(pooled) if pooled[0] is not None else None)


@dataclass
class Noised:
    """One micro-batch put through the family's forward process: the denoiser's input, its training target, the
    timesteps it is told, and each sample's loss weight (None: all alike, a plain mean squared error)."""

    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    weights: torch.Tensor | None = None

    def rows(self, select) -> Noised:
        """The same samples' rows picked by `select` (a function of one batch tensor) from every field."""
        weights = select(self.weights) if self.weights is not None else None
        return Noised(select(self.noisy), select(self.target), select(self.timesteps), weights)

    @staticmethod
    def cat(parts: Sequence[Noised]) -> Noised:
        weights = None
        if any(p.weights is not None for p in parts):
            weights = torch.cat([p.weights if p.weights is not None else torch.ones(len(p.timesteps)) for p in parts])
        return Noised(*(torch.cat([getattr(p, f) for p in parts]) for f in ("noisy", "target", "timesteps")), weights)


class Family:
    """The stages of DreamBooth where base families differ. The loop (engine/diffusion/train.py), instance data,
    packing, checkpoints, export and generation call these and nothing family-specific besides."""

    name: str
    lora_targets: tuple[str, ...]  # the LoRA targets when the settings name none (diffusers' scripts' defaults)
    trains_text_encoder: bool  # whether `train_text_encoder` is supported on this family
    # Settings only this family's training reads: part of a subject's training identity on this family alone, so a
    # setting added for one family leaves the other families' checkpoints resumable.
    training_keys: tuple[str, ...] = ()

    def check(self, base: BaseModel, settings: Settings) -> None:
        """Raise SettingsError for shape settings (those a pack shares) this base cannot train or render with (the
        message names the setting)."""

    def check_rendering(self, base: BaseModel, settings: Settings) -> None:
        """Raise SettingsError for a subject's generation setting this base cannot honour: checked before its
        training too, so that a subject is not trained only to fail at rendering."""

    def sampler(self, settings: Settings) -> str:
        """The sampler generation uses, as recorded with each image and in a class-image set's identity."""
        raise NotImplementedError

    def latent_moments(self, base: BaseModel, dist) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of a VAE posterior in the layout and scale the denoiser trains on."""
        raise NotImplementedError

    def tokenize(self, base: BaseModel, prompt: str, settings: Settings) -> tuple[torch.Tensor, ...]:
        """A prompt's token ids per text encoder, for families whose text encoders train (else empty)."""
        return ()

    def encode(self, base: BaseModel, prompts: Sequence[str], settings: Settings) -> PromptEmbeddings:
        """Prompts through the frozen text encoders, exactly as the family's stock pipeline encodes them."""
        raise NotImplementedError

    def encode_ids(self, base: BaseModel, ids: tuple[torch.Tensor, ...]) -> PromptEmbeddings:
        """Token ids through the (training) text encoders."""
        raise NotImplementedError

    def noised(self, base: BaseModel, latents: torch.Tensor, generator: torch.Generator, settings: Settings) -> Noised:
        """Noise and timesteps for `latents`, drawn from the subject's `generator` alone."""
        raise NotImplementedError

    def guidance(self, base: BaseModel, settings: Settings, n: int) -> torch.Tensor | None:
        """The guidance input of n training samples (a guidance-distilled base's embedding), or None."""
        return None

    def predict(
        self,
        base: BaseModel,
        denoiser: torch.nn.Module,
        noised: Noised,
        embeddings: PromptEmbeddings,
        guidance: torch.Tensor | None,
        resolution: int,
    ) -> torch.Tensor:
        """The denoiser's prediction for a batch, in the layout of `noised.target`."""
        raise NotImplementedError

    def pipeline(self, base: BaseModel, settings: Settings):
        """The family's stock diffusers pipeline over the base's modules (shared, not copied: a LoRA shows up)."""
        raise NotImplementedError

    def render(
        self, base: BaseModel, pipe, prompts: list[str], generators: list[torch.Generator], settings: Settings,
        slots: list[int] | None,
    ) -> list[Image.Image]:  # fmt: skip
        """One image per prompt through the stock pipeline's own call, image i starting from noise drawn from
        `generators[i]` alone and going through LoRA slot `slots[i]` (every denoiser call of it)."""
        raise NotImplementedError


def routed(base: BaseModel, **slots: list[int] | None) -> contextlib.AbstractContextManager:
    """Route each named component's batch through the given LoRA slots (components given None: not routed)."""
    chosen = {component: s for component, s in slots.items() if s is not None}
    return base.lora.routed(**chosen) if base.lora is not None and chosen else contextlib.nullcontext()
