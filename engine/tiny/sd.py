"""The `tiny` and `tiny-sdxl` base models: small random-initialised models of the real architectures, built offline from a seed.

They are saved with `save_pretrained` and loaded back through the same `from_pretrained` path as real weights, so
tests and the demo exercise the real loading code without downloading anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.library_logging import quiet_libraries
from engine.tiny.common import build_clip_tokenizer, ensure_pipeline, tiny_clip_config

# Bump when the architecture or construction changes, so stale caches are rebuilt rather than reused.
TINY_SD_VERSION = 1
TINY_SDXL_VERSION = 1


def _tiny_vae(**overrides):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **overrides,
    )


def sd_scheduler():
    """Stable Diffusion's noise schedule (SD 1.x and SDXL alike), as its DDIM scheduler config writes it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip


def build_tiny_sd(path: Path, seed: int = 0) -> None:
    """Write a complete tiny Stable Diffusion 1.x pipeline directory at `path`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    quiet_libraries()
    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seed the weights without resetting the caller's random stream
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(tiny_clip_config(tokenizer))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)


def build_tiny_sdxl(path: Path, seed: int = 0) -> None:
    """Write a complete tiny Stable Diffusion XL pipeline directory at `path`: SDXL's layout and conditioning (two
    text encoders, pooled embeddings, size/crop time ids), at tiny SD's size and speed."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    quiet_libraries()
    tokenizer = build_clip_tokenizer()
    # Unequal widths, as SDXL's 768 and 1280: mixing the two encoders up fails on a shape, not silently.
    hidden, hidden_2, projection = 32, 48, 40
    time_embed_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            # SDXL's pattern: no attention at the highest resolution, deeper transformers further down
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(4, 8),  # diffusers reads this as heads per block, as SDXL's config does
            use_linear_projection=True,
            cross_attention_dim=hidden + hidden_2,  # both encoders' hidden states, side by side
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # six time ids (original size, crop top-left, target size), each embedded, plus the pooled prompt
            projection_class_embeddings_input_dim=6 * time_embed_dim + projection,
            norm_num_groups=8,
        )
        vae = _tiny_vae(scaling_factor=0.13025)  # SDXL's VAE scale
        text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, hidden, hidden_act="quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_clip_config(tokenizer, hidden_2, hidden_act="gelu", projection_dim=projection)
        )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(),
        # SDXL ships an Euler scheduler over SD's noise schedule (its config keeps DDIM's keys too)
        scheduler=EulerDiscreteScheduler.from_config(sd_scheduler().config),
        add_watermarker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)


def ensure_tiny_sd(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny SD directory in the cache, built on first use."""
    return ensure_pipeline("tiny-sd", TINY_SD_VERSION, build_tiny_sd, cache_dir, seed)


def ensure_tiny_sdxl(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny SDXL directory in the cache, built on first use."""
    return ensure_pipeline("tiny-sdxl", TINY_SDXL_VERSION, build_tiny_sdxl, cache_dir, seed)
