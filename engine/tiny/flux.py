"""The tiny FLUX bases: `tiny-flux` (FLUX.1 [dev]-like: CLIP + T5, guidance embedding) and `tiny-flux2` (FLUX.2
[klein]-like: Qwen3 encoder, true CFG), real architectures at tiny widths, every tokenizer built in code."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.library_logging import quiet_libraries
from engine.tiny.common import _byte_alphabet, build_clip_tokenizer, ensure_pipeline, tiny_clip_config
from engine.tiny.vlm import chat_template

# Bump when the architecture or construction changes, so stale caches are rebuilt rather than reused.
TINY_FLUX_VERSION = 1
TINY_FLUX2_VERSION = 1

# FLUX's shifted flow-match schedule, as FLUX.1 [dev]'s scheduler config writes it.
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip
# The Qwen3 hidden states FLUX.2 [klein] stacks (its pipeline's `text_encoder_out_layers` default): the tiny
# encoder needs as many layers for the stock pipeline to run unchanged.
KLEIN_TEXT_LAYERS = (9, 18, 27)


def build_t5_tokenizer(model_max_length: int = 512):
    """A character-level T5 tokenizer: a `tokenizers` Unigram over every byte symbol, with and without T5's word
    marker, and T5's special tokens in T5's order (pad 0, eos 1, unk 2)."""
    from transformers import T5TokenizerFast

    alphabet = _byte_alphabet()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + ch, -1.0) for ch in alphabet] + [(ch, -2.0) for ch in alphabet]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def build_qwen_tokenizer():
    """A character-level Qwen2 tokenizer (byte-level BPE without merges) with Qwen's special tokens and Qwen3's chat
    template, which FLUX.2 [klein] applies to every prompt (thinking closed)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {tok: i for i, tok in enumerate(_byte_alphabet() + specials)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=512)  # fmt: skip
    # Whole tokens in any text, as Qwen's are (only eos and pad are registered by the constructor)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.chat_template = chat_template(thinking=True)
    return tokenizer


def _flux_vae():
    """diffusers' test VAE for FLUX: one level (no downsampling), one latent channel, FLUX's shift and scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(4,), layers_per_block=1, latent_channels=1, norm_num_groups=1, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip


def build_tiny_flux(path: Path, seed: int = 0) -> None:
    """Write a complete tiny FLUX.1 pipeline directory at `path`: guidance-distilled ([dev]'s guidance embedding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    quiet_libraries()
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    width = 32  # joint_attention_dim and pooled_projection_dim: T5's and CLIP's widths
    with torch.random.fork_rng(devices=[]):  # seed the weights without resetting the caller's random stream
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=width, pooled_projection_dim=width, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )  # fmt: skip
        text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, width, projection_dim=width))
        text_encoder_2 = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer_2), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        )  # fmt: skip
        vae = _flux_vae()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(path, safe_serialization=True)


def build_tiny_flux2(path: Path, seed: int = 0) -> None:
    """Write a complete tiny FLUX.2 [klein] pipeline directory at `path`: undistilled, true CFG."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    quiet_libraries()
    tokenizer = build_qwen_tokenizer()
    hidden = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=max(KLEIN_TEXT_LAYERS), num_attention_heads=2, num_key_value_heads=1,
                        head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        )  # fmt: skip
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=len(KLEIN_TEXT_LAYERS) * hidden, timestep_guidance_channels=32,
            mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
        )  # fmt: skip
        vae = AutoencoderKLFlux2(
            block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
            layers_per_block=1, latent_channels=1, norm_num_groups=1, sample_size=32, use_quant_conv=False,
            use_post_quant_conv=False, mid_block_add_attention=False,
        )  # fmt: skip
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=transformer, is_distilled=False,
    )  # fmt: skip
    pipe.save_pretrained(path, safe_serialization=True)


def ensure_tiny_flux(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny FLUX.1 directory in the cache, built on first use."""
    return ensure_pipeline("tiny-flux", TINY_FLUX_VERSION, build_tiny_flux, cache_dir, seed)


def ensure_tiny_flux2(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny FLUX.2 [klein] directory in the cache, built on first use."""
    return ensure_pipeline("tiny-flux2", TINY_FLUX2_VERSION, build_tiny_flux2, cache_dir, seed)
