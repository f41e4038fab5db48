"""One subject's own share of a pack: its training identity, loss, optimizer, schedule, RNG, step log and
checkpoints."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from engine import storage
from engine.diffusion.base_model import BaseModel
from engine.diffusion.checkpoints import TrainingState, save_checkpoint
from engine.diffusion.families import family_of
from engine.diffusion.family import Noised
from engine.diffusion.instance_data import TrainingExamples
from engine.diffusion.subject import CHECKPOINTS, TRAIN_LOG, Subject
from engine.settings import Settings

# Settings that change the optimisation itself on every family (plus the family's own `training_keys`); a checkpoint
# made with other values cannot be resumed.
TRAINING_IDENTITY_KEYS = (
    "mode", "learning_rate", "train_text_encoder", "lora_rank", "lora_alpha", "lora_target_modules",
    "text_encoder_lora_target_modules", "train_batch_size", "gradient_accumulation_steps", "max_grad_norm",
    "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "resolution", "center_crop", "with_prior_preservation", "prior_loss_weight", "max_train_steps", "data_parallel",
)  # fmt: skip

@dataclass
class StepRecord:
    step: int
    loss: float
    instance_loss: float
    prior_loss: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    steps: int
    log: list[dict[str, Any]]
    resumed_from: int | None
    weights_uri: str

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.log]


def training_identity(subject: Subject, settings: Settings, base: BaseModel) -> str:
    family = family_of(base)
    values = {k: getattr(settings, k) for k in (*TRAINING_IDENTITY_KEYS, *family.training_keys)}
    # The layers trained, not how they were named: "the family's default" and that list spelled out are one identity.
    values["lora_target_modules"] = settings.lora_target_modules or list(family.lora_targets)
    values.update(
        base=base.fingerprint,
        images=list(subject.instance_images),
        instance_prompt=subject.instance_prompt,
        class_prompt=subject.class_prompt,
        seed=subject.effective_seed,
    )
    if subject.instance_prompts:  # only when set: a fixed-prompt subject keeps the identity (and checkpoints) it had
        values["instance_prompts"] = list(subject.instance_prompts)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_optimizer(params: list[torch.nn.Parameter], settings: Settings, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=settings.effective_learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
    )
    if settings.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        except ImportError:
            pass
    return torch.optim.AdamW(params, **kwargs)


@dataclass
class SubjectTraining:
    """One subject's own share of a pack: its examples, slot, optimizer, schedule, RNG, log and checkpoints."""

    subject: Subject
    settings: Settings
    subject_dir: str
    slot: int
    identity: str
    examples: TrainingExamples
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    on_step: Callable[[StepRecord], None] | None
    log: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0  # optimizer steps done
    resumed_from: int | None = None
    micro: int = 0  # micro-batches accumulated towards the next step
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss, instance, prior of this step
    step_began: float = field(default_factory=time.perf_counter)

    def loss(self, prediction: torch.Tensor, noised: Noised) -> list[torch.Tensor]:
        """The subject's DreamBooth loss over its own samples: [loss, instance loss, prior loss]."""
        if self.examples.class_ is None:
            loss = _mse(prediction, noised.target, noised.weights)
            return [loss, loss.detach(), torch.zeros((), device=loss.device)]
        halves = zip(prediction.chunk(2), noised.target.chunk(2), _halves(noised.weights))
        instance_loss, prior_loss = (_mse(p, t, w) for p, t, w in halves)
        loss = instance_loss + self.settings.prior_loss_weight * prior_loss
        return [loss, instance_loss.detach(), prior_loss.detach()]

    @property
    def checkpoints_uri(self) -> str:
        return storage.join(self.subject_dir, CHECKPOINTS)

    def checkpoint(self) -> None:
        state = TrainingState(
            step=self.step,
            trainable={name: p.detach() for name, p in self.params.items()},
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(),  # JSON: lambdas are functions, stored as None
            rng={"generator": self.generator.get_state()},
            # the prompt each instance photo trained with, beside the identity that hashes it: readable
            extra={"identity": self.identity, "instance_prompts": list(self.subject.photo_prompts), "log": self.log,
                   "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None},
        )  # fmt: skip
        save_checkpoint(self.checkpoints_uri, state, keep=self.settings.checkpoints_total_limit)
        write_train_log(self.subject_dir, self.log)


def _mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error; with per-sample weights, each sample's weighted mean, then their mean (diffusers' FLUX)."""
    if weights is None:
        return F.mse_loss(prediction, target.float())
    squared = weights.float().reshape(-1, *([1] * (prediction.ndim - 1))) * (prediction - target.float()) ** 2
    return squared.reshape(squared.shape[0], -1).mean(dim=1).mean()


def _halves(weights: torch.Tensor | None) -> tuple:
    return weights.chunk(2) if weights is not None else (None, None)


def write_train_log(subject_dir: str, log: list[dict[str, Any]]) -> None:
    """The per-step log as JSON lines, rewritten whole (the report reads it; TensorBoard events are a tracker's,
    see engine/tracking.py)."""
    storage.write_bytes(storage.join(subject_dir, TRAIN_LOG), "".join(json.dumps(r) + "\n" for r in log).encode())
