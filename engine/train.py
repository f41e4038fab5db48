"""DreamBooth for one subject: the training loop, from cached examples to checkpoints and exported weights.

Read `train_subject` top to bottom: attach what trains (LoRA or the full UNet), build the optimizer and schedule,
resume from the newest checkpoint if there is one, then loop: sample latents → add noise → predict → instance loss
plus λ·prior loss → step. Every `checkpointing_steps` the whole state is saved; at the end the weights are exported
in diffusers' layout. The base model is left as it was found (see `BaseModel.reset`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine import storage
from engine.checkpoints import CheckpointError, TrainingState, load_latest_checkpoint, save_checkpoint
from engine.instance_data import TrainingExamples, prepare_examples
from engine.models import BaseModel
from engine.settings import Settings
from engine.subject import Subject
from engine.weights import export_weights, lora_components, lora_config

# Settings that change the optimisation itself; a checkpoint made with other values cannot be resumed.
TRAINING_IDENTITY_KEYS = (
    "mode", "learning_rate", "train_text_encoder", "lora_rank", "lora_alpha", "lora_target_modules",
    "text_encoder_lora_target_modules", "train_batch_size", "gradient_accumulation_steps", "max_grad_norm",
    "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "resolution", "center_crop", "with_prior_preservation", "prior_loss_weight", "max_train_steps",
)  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the step is not applied, so the last checkpoint stays good."""


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
    values = {k: getattr(settings, k) for k in TRAINING_IDENTITY_KEYS}
    values.update(
        base=base.fingerprint,
        images=list(subject.instance_images),
        instance_prompt=subject.instance_prompt,
        class_prompt=subject.class_prompt,
        seed=subject.effective_seed,
    )
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attach_trainable(base: BaseModel, settings: Settings) -> dict[str, torch.nn.Parameter]:
    """Make the subject's weights trainable on the shared base model; returns them by stable name."""
    base.reset()
    if settings.mode == "lora":
        for component in lora_components(settings):
            base.add_lora(component, lora_config(settings, component))
    else:
        base.snapshot("unet")
        base.unet.requires_grad_(True)
        if settings.train_text_encoder:
            base.snapshot("text_encoder")
            base.text_encoder.requires_grad_(True)
    components = [("unet", base.unet)] + ([("text_encoder", base.text_encoder)] if settings.train_text_encoder else [])
    trainable = {}
    for prefix, module in components:
        module.train()
        for name, param in module.named_parameters():
            if param.requires_grad:
                trainable[f"{prefix}.{name}"] = param
    if settings.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if settings.train_text_encoder:
            base.text_encoder.activation_checkpointing_enable()
    return trainable


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


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(generator: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _target(base: BaseModel, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = base.noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return base.noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def training_loss(
    base: BaseModel, examples: TrainingExamples, settings: Settings, generator: torch.Generator, autocast
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro-batch: instance (and class) latents noised, predicted, and the loss split as DreamBooth's paper has it."""
    bs = settings.train_batch_size
    latents = examples.instance.sample(torch.randint(len(examples.instance), (bs,), generator=generator), generator)
    embeddings = examples.embeddings(base, "instance", bs)
    prior = examples.class_ is not None
    if prior:
        class_latents = examples.class_.sample(torch.randint(len(examples.class_), (bs,), generator=generator), generator)
        latents = torch.cat([latents, class_latents])
        embeddings = torch.cat([embeddings, examples.embeddings(base, "class", bs)])
    noise = torch.randn(latents.shape, generator=generator).to(base.device)
    timesteps = torch.randint(
        0, base.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(base.device)
    noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
    with autocast:
        prediction = base.unet(noisy, timesteps, embeddings, return_dict=False)[0]
    target = _target(base, latents, noise, timesteps)
    if not prior:
        loss = F.mse_loss(prediction.float(), target.float())
        return loss, loss.detach(), torch.zeros(())
    pred_instance, pred_class = prediction.float().chunk(2)
    target_instance, target_class = target.float().chunk(2)
    instance_loss = F.mse_loss(pred_instance, target_instance)
    prior_loss = F.mse_loss(pred_class, target_class)
    return instance_loss + settings.prior_loss_weight * prior_loss, instance_loss.detach(), prior_loss.detach()


def train_subject(
    base: BaseModel,
    subject: Subject,
    settings: Settings,
    subject_dir: str,
    class_image_uris: list[str] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Train one subject on `base`, checkpointing under `subject_dir`, resuming from its newest checkpoint."""
    from diffusers.optimization import get_scheduler

    use_prior = settings.with_prior_preservation
    if use_prior and not class_image_uris:
        raise ValueError("with_prior_preservation is on but no class images were given")
    checkpoints_uri = storage.join(subject_dir, "checkpoints")
    identity = training_identity(subject, settings, base)
    resume = load_latest_checkpoint(checkpoints_uri)
    if resume is not None and resume.extra.get("identity") != identity:
        raise CheckpointError(
            f"{checkpoints_uri}: the checkpoint at step {resume.step} was made with other training settings or "
            "inputs; remove the subject's checkpoints to start over"
        )

    try:
        examples = prepare_examples(
            base, subject.instance_images, subject.instance_prompt, settings,
            class_image_uris if use_prior else None, subject.class_prompt,
        )  # fmt: skip
        torch.manual_seed(subject.effective_seed)  # LoRA initialisation draws from the global RNG
        trainable = attach_trainable(base, settings)
        params = list(trainable.values())
        optimizer = make_optimizer(params, settings, base.device)
        lr_scheduler = get_scheduler(
            settings.lr_scheduler,
            optimizer,
            num_warmup_steps=settings.lr_warmup_steps,
            num_training_steps=settings.max_train_steps,
        )
        precision = settings.effective_mixed_precision(base.device.type)
        autocast = settings.autocast(base.device.type)
        scaler = torch.amp.GradScaler(base.device.type, enabled=precision == "fp16")
        generator = torch.Generator().manual_seed(subject.effective_seed)
        log: list[dict[str, Any]] = []
        start = 0
        if resume is not None:
            with torch.no_grad():
                for name, tensor in resume.trainable.items():
                    trainable[name].copy_(tensor)
            optimizer.load_state_dict(resume.optimizer)
            lr_scheduler.load_state_dict(resume.lr_scheduler)
            if resume.extra.get("scaler"):
                scaler.load_state_dict(resume.extra["scaler"])
            _restore_rng(generator, resume.rng)
            log, start = resume.extra["log"], resume.step

        def checkpoint(step: int) -> None:
            state = TrainingState(
                step=step,
                trainable={name: p.detach() for name, p in trainable.items()},
                optimizer=optimizer.state_dict(),
                lr_scheduler=lr_scheduler.state_dict(),  # JSON: lambdas are functions, stored as None
                rng=_rng_state(generator),
                extra={"identity": identity, "log": log, "scaler": scaler.state_dict() if scaler.is_enabled() else None},
            )
            save_checkpoint(checkpoints_uri, state, keep=settings.checkpoints_total_limit)
            write_train_log(subject_dir, log)

        for step in range(start + 1, settings.max_train_steps + 1):
            began = time.perf_counter()
            total = instance_total = prior_total = 0.0
            for _ in range(settings.gradient_accumulation_steps):
                loss, instance_loss, prior_loss = training_loss(base, examples, settings, generator, autocast)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss is {loss.item()} at step {step}; lower learning_rate or use bf16")
                scaler.scale(loss / settings.gradient_accumulation_steps).backward()
                total += loss.item() / settings.gradient_accumulation_steps
                instance_total += instance_loss.item() / settings.gradient_accumulation_steps
                prior_total += prior_loss.item() / settings.gradient_accumulation_steps
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = StepRecord(step, total, instance_total, prior_total, lr_scheduler.get_last_lr()[0],
                                time.perf_counter() - began)  # fmt: skip
            log.append(record.__dict__)
            if step % settings.checkpointing_steps == 0 or step == settings.max_train_steps:
                checkpoint(step)
            if on_step is not None:
                on_step(record)

        weights_uri = storage.join(subject_dir, "weights")
        export_weights(base, settings, weights_uri)
        write_train_log(subject_dir, log)
        return TrainResult(steps=settings.max_train_steps, log=log, resumed_from=resume.step if resume else None,
                           weights_uri=weights_uri)  # fmt: skip
    finally:
        base.reset()


def write_train_log(subject_dir: str, log: list[dict[str, Any]]) -> None:
    """The per-step log as JSON lines (and TensorBoard events when tensorboard is installed), rewritten whole."""
    storage.write_bytes(storage.join(subject_dir, "train_log.jsonl"), "".join(json.dumps(r) + "\n" for r in log).encode())
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        with SummaryWriter(tmp) as writer:
            for r in log:
                for key in ("loss", "instance_loss", "prior_loss", "lr", "seconds"):
                    writer.add_scalar(f"train/{key}", r[key], r["step"])
        storage.remove(storage.join(subject_dir, "tensorboard"))
        storage.upload_dir(Path(tmp), storage.join(subject_dir, "tensorboard"))
