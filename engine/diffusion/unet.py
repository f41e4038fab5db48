"""The UNet family (Stable Diffusion 1.x/2.x and SDXL): CLIP prompt encoding (SDXL: two encoders, pooled embedding,
size/crop time ids), VAE-scaled latents, noise prediction (epsilon or v) at DDPM timesteps, classifier-free guidance
through the stock pipeline's sampler."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from engine.diffusion.base_model import BaseModel
from engine.diffusion.family import Family, Noised, PromptEmbeddings, routed
from engine.settings import Settings


def tokenize(base: BaseModel, prompt: str) -> tuple[torch.Tensor, ...]:
    """The prompt's token ids [1, max_length] for each text encoder, in `base.text_encoder_names` order."""
    return tuple(
        tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(base.device)
        for tokenizer in base.tokenizers
    )


def encode_prompts(base: BaseModel, ids: tuple[torch.Tensor, ...]) -> PromptEmbeddings:
    """Token ids (one tensor [n, L] per text encoder) through the text encoders, as diffusers' pipelines encode:
    SD 1.x/2.x the last hidden states; SDXL both encoders' penultimate hidden states side by side, and the pooled
    projection of the second."""
    if not base.is_sdxl:
        return PromptEmbeddings(base.text_encoder(ids[0])[0], None)
    hidden, pooled = [], None
    for name, tokens in zip(base.text_encoder_names, ids):
        out = getattr(base, name)(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def add_time_ids(resolution: int, n: int, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning for n samples: original size, crop top-left, target size, [n, 6].

    Every example is resized and cropped to `resolution` before its latents are cached, and generation asks for that
    size uncropped (the pipeline's default), so each sample is conditioned on what generation will ask for: (R, R),
    (0, 0), (R, R). diffusers' train_dreambooth_lora_sdxl.py has used both these fixed values and each photo's own
    size and crop."""
    values = [resolution, resolution, 0, 0, resolution, resolution]
    return torch.tensor([values], dtype=torch.float32, device=device).repeat(n, 1)


def unet_added_conditions(embeddings: Sequence[PromptEmbeddings], resolutions: Sequence[int]) -> dict | None:
    """The UNet's `added_cond_kwargs` for consecutive batches of embeddings, each trained at its resolution: SDXL's
    pooled embeddings and time ids; None for SD 1.x/2.x (no pooled embeddings), whose UNet takes none."""
    if embeddings[0].pooled is None:
        return None
    time_ids = [add_time_ids(r, len(e.hidden), e.hidden.device) for e, r in zip(embeddings, resolutions)]
    return {"text_embeds": torch.cat([e.pooled for e in embeddings]), "time_ids": torch.cat(time_ids)}


def make_scheduler(name: str, config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}")


class UNetFamily(Family):
    """SD 1.x/2.x (`kind` "sd") and SDXL ("sdxl")."""

    name = "unet"
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    trains_text_encoder = True

    def sampler(self, settings: Settings) -> str:
        return settings.scheduler

    def latent_moments(self, base: BaseModel, dist) -> tuple[torch.Tensor, torch.Tensor]:
        scale = base.vae.config.scaling_factor
        return dist.mean * scale, dist.std * scale

    def tokenize(self, base: BaseModel, prompt: str, settings: Settings) -> tuple[torch.Tensor, ...]:
        return tokenize(base, prompt)

    def encode(self, base: BaseModel, prompts: Sequence[str], settings: Settings) -> PromptEmbeddings:
        ids = [tokenize(base, p) for p in prompts]
        return encode_prompts(base, tuple(torch.cat(per_encoder) for per_encoder in zip(*ids)))

    def encode_ids(self, base: BaseModel, ids: tuple[torch.Tensor, ...]) -> PromptEmbeddings:
        return encode_prompts(base, ids)

    def noised(self, base: BaseModel, latents: torch.Tensor, generator: torch.Generator, settings: Settings) -> Noised:
        scheduler = base.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator).to(base.device)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        ).to(base.device)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        return Noised(scheduler.add_noise(latents, noise, timesteps), target, timesteps)

    def predict(
        self,
        base: BaseModel,
        denoiser: torch.nn.Module,
        noised: Noised,
        embeddings: PromptEmbeddings,
        guidance: torch.Tensor | None,
        resolution: int,
    ) -> torch.Tensor:
        added = unet_added_conditions([embeddings], [resolution])
        return denoiser(noised.noisy, noised.timesteps, embeddings.hidden, added_cond_kwargs=added, return_dict=False)[0]

    def pipeline(self, base: BaseModel, settings: Settings):
        return make_pipeline(base, settings.scheduler)

    def render(
        self, base: BaseModel, pipe, prompts: list[str], generators: list[torch.Generator], settings: Settings,
        slots: list[int] | None,
    ) -> list[Image.Image]:  # fmt: skip
        guided = settings.guidance_scale > 1 and base.unet.config.time_cond_proj_dim is None  # as the pipeline decides
        size = settings.resolution // base.vae_scale
        latents = torch.stack(
            [torch.randn((base.unet.config.in_channels, size, size), generator=g) for g in generators]
        ).to(base.device)
        negative = [settings.negative_prompt] * len(prompts) if settings.negative_prompt else None
        text_slots = {name: slots for name in base.text_encoder_names}  # every text encoder, routed alike
        with settings.autocast(base.device.type), routed(base, **text_slots):  # bf16 on GPU by default
            embeddings = _encode_for_pipeline(pipe, prompts, base.device, guided, negative)
        # The pipeline runs the UNet on [negative half; prompt half] when guided: each image's slot twice.
        unet_slots = slots and (slots * 2 if guided else slots)
        with settings.autocast(base.device.type), routed(base, unet=unet_slots):
            out = pipe(
                **embeddings, height=settings.resolution, width=settings.resolution,
                num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                latents=latents, generator=generators, output_type="pil",
            )  # fmt: skip
        return out.images


def make_pipeline(base: BaseModel, scheduler: str):
    """The base model's stock pipeline (StableDiffusionPipeline, or StableDiffusionXLPipeline) over its modules,
    shared, not copied: a LoRA on them shows up here."""
    modules = dict(
        unet=base.unet, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        scheduler=make_scheduler(scheduler, base.noise_scheduler.config),
    )  # fmt: skip
    if base.is_sdxl:
        modules.update(
            text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
            # as from_pretrained sets it: an empty negative prompt is a zero embedding, not the encoded ""
            force_zeros_for_empty_prompt=base.index.get("force_zeros_for_empty_prompt", True),
        )  # fmt: skip
    else:
        modules.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = base.pipeline_class(**modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode_for_pipeline(pipe, prompts: list[str], device: torch.device, guided: bool, negative: list[str] | None) -> dict:
    """The pipeline's own prompt encoding, as the keyword arguments its __call__ takes: SD's prompt and negative
    embeddings, and SDXL's pooled ones besides (its encode_prompt returns all four, in this order)."""
    encoded = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
        negative_prompt=negative,
    )  # fmt: skip
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return dict(zip(names, encoded))
