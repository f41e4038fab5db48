"""The rectified-flow (flow-matching) training objective of FLUX-class bases, as diffusers' FLUX DreamBooth scripts
define it: a sigma per sample, noisy = (1 - σ)·x + σ·ε, velocity target ε - x, an optional loss weighting."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

WeightingScheme = Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"]
WEIGHTING_SCHEMES: tuple[str, ...] = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class FlowMatching:
    """How training draws sigmas and weighs each sample's error.

    `sigmas` is the scheduler's training table (descending, as FlowMatchEulerDiscreteScheduler builds it: shifted by
    its `shift` unless the base shifts per resolution at sampling time, as FLUX.1 does); a sample's sigma is the
    table's entry at a point u in [0, 1) drawn by the weighting scheme, and its timestep is σ·num_train_timesteps.
    `logit_normal` draws u = sigmoid(N(logit_mean, logit_std)); `mode` bends a uniform u towards the middle by
    `mode_scale` (SD3's mode sampling); the others draw u uniformly. `sigma_sqrt` and `cosmap` weigh the loss (σ⁻²,
    SD3's cosine map); the sampling-only schemes weigh every sample alike.
    """

    sigmas: torch.Tensor  # [num_train_timesteps], descending, on the CPU
    num_train_timesteps: int
    weighting_scheme: WeightingScheme = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    @classmethod
    def from_scheduler(cls, scheduler_config: dict, **scheme: float | str) -> FlowMatching:
        """The objective over a fresh scheduler's training table (a scheduler that has sampled holds another)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if scheme.get("weighting_scheme", "none") not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {scheme['weighting_scheme']!r}")
        fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        return cls(fresh.sigmas.float().clone(), fresh.config.num_train_timesteps, **scheme)

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples' sigmas and timesteps ([n] each, CPU), drawn from `generator` alone."""
        if self.weighting_scheme == "logit_normal":
            u = torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, (n,), generator=generator))
        else:
            u = torch.rand((n,), generator=generator)
            if self.weighting_scheme == "mode":
                u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        # u = 1 can come out of a sigmoid in fp32: the index stays inside the table
        index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        sigmas = self.sigmas[index]
        return sigmas, sigmas * self.num_train_timesteps

    @staticmethod
    def noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The point at σ on the straight path from the data (σ = 0) to the noise (σ = 1)."""
        s = _per_sample(sigmas, latents)
        return (1.0 - s) * latents + s * noise

    @staticmethod
    def target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity along that path, which the transformer predicts."""
        return noise - latents

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Each sample's loss weight ([n])."""
        if self.weighting_scheme == "sigma_sqrt":
            return sigmas.float() ** -2.0
        if self.weighting_scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
        return torch.ones_like(sigmas, dtype=torch.float32)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The weighted mean squared error over the samples given (each sample's mean, then their mean)."""
        weights = _per_sample(self.weights(sigmas).to(prediction.device), prediction)
        squared = weights * (prediction.float() - target.float()) ** 2
        return squared.reshape(squared.shape[0], -1).mean(dim=1).mean()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[n] values broadcast over the other dimensions of `like`, on its device and in its dtype."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
