"""The FLUX families: FLUX.1 (CLIP pooled + T5 hidden states, 2x2-packed latents with VAE shift and scale, a
guidance embedding on [dev]) and FLUX.2 [klein] (stacked Qwen3 hidden states, batch-normalised 2x2-patchified latents,
true CFG, both halves in one transformer call). Both train by flow matching (engine/diffusion/flow_matching.py) and
sample with FlowMatch Euler at the resolution-dependent shift: FLUX.1 through its stock pipeline's call, [klein]
through the stock pipeline's parts with the CFG halves batched."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from engine.diffusion.base_model import BaseModel
from engine.diffusion.family import Family, Noised, PromptEmbeddings, routed
from engine.diffusion.flow_matching import FlowMatching
from engine.settings import Settings, SettingsError

SAMPLER = "flow_match_euler"
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # both stock pipelines' default
# Loss weights other than 1 come only from these schemes; the others only shape where sigmas are drawn.
WEIGHTED_SCHEMES = ("sigma_sqrt", "cosmap")


def max_sequence_length(settings: Settings) -> int:
    return settings.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH


class FlowFamily(Family):
    """What FLUX.1 and FLUX.2 share: flow matching, 2x2 latent patches, the stock pipeline's sampler and encoding."""

    trains_text_encoder = False  # the T5 / Qwen3 encoders stay frozen, their embeddings cached (as the services do)
    training_keys = (
        "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length", "train_guidance_scale",
    )  # fmt: skip

    def __init__(self) -> None:
        self._objectives: dict[tuple, FlowMatching] = {}

    def check(self, base: BaseModel, settings: Settings) -> None:
        multiple = base.vae_scale * 2
        if settings.resolution % multiple:
            raise SettingsError(
                f"resolution: {settings.resolution} is not a multiple of {multiple} (this base's VAE scale "
                f"{base.vae_scale} x its 2x2 latent patches)"
            )
        if settings.train_text_encoder:
            raise SettingsError("train_text_encoder: not supported on FLUX bases (their text encoders stay frozen)")

    def sampler(self, settings: Settings) -> str:
        return SAMPLER

    def objective(self, base: BaseModel, settings: Settings) -> FlowMatching:
        scheme = {"weighting_scheme": settings.weighting_scheme, "logit_mean": settings.logit_mean,
                  "logit_std": settings.logit_std, "mode_scale": settings.mode_scale}  # fmt: skip
        key = (id(base.noise_scheduler), *scheme.values())
        if key not in self._objectives:
            self._objectives[key] = FlowMatching.from_scheduler(base.noise_scheduler.config, **scheme)
        return self._objectives[key]

    def noised(self, base: BaseModel, latents: torch.Tensor, generator: torch.Generator, settings: Settings) -> Noised:
        objective = self.objective(base, settings)
        noise = torch.randn(latents.shape, generator=generator).to(base.device)
        sigmas, timesteps = objective.draw(latents.shape[0], generator)
        weights = objective.weights(sigmas).to(base.device) if settings.weighting_scheme in WEIGHTED_SCHEMES else None
        sigmas = sigmas.to(base.device)
        return Noised(objective.noisy(latents, noise, sigmas), objective.target(latents, noise), timesteps.to(base.device),
                      weights)  # fmt: skip

    def pipeline(self, base: BaseModel, settings: Settings):
        from diffusers import FlowMatchEulerDiscreteScheduler

        modules = {name: getattr(base, name) for name in ("vae", "transformer", *base.text_encoder_names)}
        modules.update({name.replace("text_encoder", "tokenizer"): tok
                        for name, tok in zip(base.text_encoder_names, base.tokenizers)})  # fmt: skip
        # A fresh scheduler: sampling sets its timesteps, and the base's own keeps the training table
        modules["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(base.noise_scheduler.config)
        if base.kind == "flux2":
            modules["is_distilled"] = base.index.get("is_distilled", False)
        pipe = base.pipeline_class(**modules)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _latent_grid(self, base: BaseModel, resolution: int) -> int:
        """The side of the 2x2-patched latent grid at `resolution` (the image token grid)."""
        return resolution // (base.vae_scale * 2)

    # -- what differs between FLUX.1 and FLUX.2: the latent layout, its image tokens, the text's position ids -------

    pooled: bool  # whether the transformer takes a pooled text embedding (FLUX.1: CLIP's)

    def latent_shape(self, base: BaseModel, resolution: int) -> tuple[int, int, int]:
        """One image's latent [C, H, W] at `resolution`, in the layout the transformer trains on (before packing)."""
        raise NotImplementedError

    def to_tokens(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [n, C, H, W] as the transformer's image tokens [n, tokens, width], and their position ids."""
        raise NotImplementedError

    def from_tokens(self, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Image tokens back to latents of `shape` (the inverse of `to_tokens`)."""
        raise NotImplementedError

    def text_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        """The position ids of the prompt's tokens."""
        raise NotImplementedError

    # -- shared by both, through the methods above --------------------------------------------------------------

    def encode(self, base: BaseModel, prompts: Sequence[str], settings: Settings) -> PromptEmbeddings:
        # FLUX.1's encode_prompt returns (T5 hidden states, CLIP pooled, text ids); FLUX.2's (hidden states, text ids)
        out = self.pipeline(base, settings).encode_prompt(
            prompt=list(prompts), device=base.device, max_sequence_length=max_sequence_length(settings)
        )
        return PromptEmbeddings(out[0], out[1] if self.pooled else None)

    def predict(
        self,
        base: BaseModel,
        denoiser: torch.nn.Module,
        noised: Noised,
        embeddings: PromptEmbeddings,
        guidance: torch.Tensor | None,
        resolution: int,
    ) -> torch.Tensor:
        tokens, image_ids = self.to_tokens(noised.noisy)
        pooled = {"pooled_projections": embeddings.pooled} if self.pooled else {}
        prediction = denoiser(
            hidden_states=tokens, timestep=noised.timesteps / 1000, guidance=guidance,
            encoder_hidden_states=embeddings.hidden, txt_ids=self.text_ids(embeddings.hidden), img_ids=image_ids,
            return_dict=False, **pooled,
        )[0]  # fmt: skip
        return self.from_tokens(prediction, noised.noisy.shape)

    def _noise(self, base: BaseModel, generators: list[torch.Generator], settings: Settings) -> torch.Tensor:
        """Each image's starting latent from its own generator alone, in the layout of `latent_shape`."""
        shape = self.latent_shape(base, settings.resolution)
        return torch.stack([torch.randn(shape, generator=g) for g in generators])


class FluxFamily(FlowFamily):
    """FLUX.1 [dev] (guidance-distilled: a guidance embedding) and [schnell] (none)."""

    name = "flux"
    pooled = True
    # diffusers' train_dreambooth_lora_flux.py's default layers, and the single blocks' MLP input. The single blocks'
    # `proj_out` is left out: its name is also the transformer's final projection, which a suffix match would take.
    lora_targets = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2", "proj_mlp",
    )  # fmt: skip

    def check_rendering(self, base: BaseModel, settings: Settings) -> None:
        _refuse_negative_prompt(settings)

    def latent_moments(self, base: BaseModel, dist) -> tuple[torch.Tensor, torch.Tensor]:
        config = base.vae.config
        return (dist.mean - config.shift_factor) * config.scaling_factor, dist.std * config.scaling_factor

    def latent_shape(self, base: BaseModel, resolution: int) -> tuple[int, int, int]:
        side = 2 * self._latent_grid(base, resolution)  # the VAE's latents, packed 2x2 into tokens
        return base.transformer.config.in_channels // 4, side, side

    def to_tokens(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers import FluxPipeline

        n, c, h, w = latents.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, latents.device, latents.dtype)
        return FluxPipeline._pack_latents(latents, n, c, h, w), image_ids

    def from_tokens(self, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(tokens, shape[2], shape[3], 1)  # `shape` is in latent cells: scale 1

    def text_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype)

    def guidance(self, base: BaseModel, settings: Settings, n: int) -> torch.Tensor | None:
        if not base.transformer.config.guidance_embeds:
            return None  # [schnell]: no guidance input
        return torch.full((n,), settings.train_guidance_scale, device=base.device)

    def render(
        self, base: BaseModel, pipe, prompts: list[str], generators: list[torch.Generator], settings: Settings,
        slots: list[int] | None,
    ) -> list[Image.Image]:  # fmt: skip
        latents, _ = self.to_tokens(self._noise(base, generators, settings))
        # [dev] takes the guidance scale as an embedding: one transformer pass per step, each image's slot once
        with settings.autocast(base.device.type), routed(base, transformer=slots):
            out = pipe(
                prompt=prompts, height=settings.resolution, width=settings.resolution,
                num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                latents=latents.to(base.device), max_sequence_length=max_sequence_length(settings), output_type="pil",
            )  # fmt: skip
        return out.images


class Flux2Family(FlowFamily):
    """FLUX.2 [klein]: undistilled, true classifier-free guidance."""

    name = "flux2"
    pooled = False
    # diffusers' FLUX.2 layers: both attention streams, both feed-forwards, and the single blocks' fused QKV+MLP input
    # (their output `attn.to_out` shares its suffix with the double blocks' ModuleList, so it cannot be named alone).
    lora_targets = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out", "attn.to_qkv_mlp_proj",
    )  # fmt: skip

    def latent_moments(self, base: BaseModel, dist) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers import Flux2KleinPipeline

        mean, std = _latent_norm(base)
        patchify = Flux2KleinPipeline._patchify_latents
        return (patchify(dist.mean) - mean) / std, patchify(dist.std) / std

    def latent_shape(self, base: BaseModel, resolution: int) -> tuple[int, int, int]:
        side = self._latent_grid(base, resolution)  # the latents come patchified 2x2 (latent_moments)
        return base.transformer.config.in_channels, side, side

    def to_tokens(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._pack_latents(latents), Flux2KleinPipeline._prepare_latent_ids(latents).to(latents.device)

    def from_tokens(self, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return tokens.permute(0, 2, 1).reshape(shape)

    def text_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._prepare_text_ids(hidden).to(hidden.device)

    def render(
        self, base: BaseModel, pipe, prompts: list[str], generators: list[torch.Generator], settings: Settings,
        slots: list[int] | None,
    ) -> list[Image.Image]:  # fmt: skip
        """The stock pipeline's sampling (its timesteps, FlowMatch Euler steps and decoding) with both CFG halves in
        one transformer call per step: the stock call runs the prompt half and then the negative half as two passes.
        The negative half encodes `negative_prompt` (the stock pipeline always encodes "", the setting's default)."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

        n, steps, device = len(prompts), settings.num_inference_steps, base.device
        guided = settings.guidance_scale > 1 and not pipe.config.is_distilled  # as the stock pipeline decides
        halves = 2 if guided else 1
        noise = self._noise(base, generators, settings)
        # Rows [prompts; negatives]: each image's slot on both of its halves
        with settings.autocast(device.type), routed(base, transformer=slots and slots * halves):
            texts = list(prompts) + [settings.negative_prompt] * n if guided else list(prompts)
            embeddings, text_ids = pipe.encode_prompt(
                prompt=texts, device=device, max_sequence_length=max_sequence_length(settings)
            )
            latents, image_ids = self.to_tokens(noise.to(device, embeddings.dtype))
            flow_sigmas = getattr(pipe.scheduler.config, "use_flow_sigmas", False)
            sigmas = None if flow_sigmas else np.linspace(1.0, 1 / steps, steps)
            mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=steps)
            timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
            pipe.scheduler.set_begin_index(0)
            for t in timesteps:
                velocity = base.transformer(
                    hidden_states=latents.to(base.transformer.dtype).repeat(halves, 1, 1),
                    timestep=t.expand(n * halves).to(latents.dtype) / 1000, guidance=None,
                    encoder_hidden_states=embeddings, txt_ids=text_ids, img_ids=image_ids.repeat(halves, 1, 1),
                    return_dict=False,
                )[0]  # fmt: skip
                if guided:
                    cond, uncond = velocity.chunk(2)
                    velocity = uncond + settings.guidance_scale * (cond - uncond)
                latents = pipe.scheduler.step(velocity, t, latents, return_dict=False)[0]
            return self._decode(base, pipe, self.from_tokens(latents, noise.shape))

    def _decode(self, base: BaseModel, pipe, latents: torch.Tensor) -> list[Image.Image]:
        """Latents to images, as the stock pipeline ends: undo the VAE's batch norm, unpatchify, decode."""
        mean, std = (m.to(latents.device, latents.dtype) for m in _latent_norm(base))
        latents = pipe._unpatchify_latents(latents * std + mean)
        return pipe.image_processor.postprocess(base.vae.decode(latents, return_dict=False)[0], output_type="pil")


def _latent_norm(base: BaseModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The FLUX.2 VAE's batch-norm mean and std [1, C, 1, 1]: patchified latents are normalised by them."""
    bn = base.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + base.vae.config.batch_norm_eps)
    return bn.running_mean.view(1, -1, 1, 1), std


def _refuse_negative_prompt(settings: Settings) -> None:
    """FLUX.1 [dev] is guidance-distilled ([schnell] timestep-distilled): it samples with no unconditional pass, so a
    negative prompt would be silently dropped. A user who sets one expects it to act: refuse it instead."""
    if settings.negative_prompt:
        raise SettingsError(
            f"negative_prompt: {settings.negative_prompt!r} is not used by FLUX.1 bases (guidance-distilled: no "
            "unconditional pass to condition on it); leave it empty. FLUX.2 [klein] bases honour it."
        )
