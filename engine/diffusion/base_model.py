"""The base Stable Diffusion model (1.x/2.x or XL): resolving `tiny` / `tiny-sdxl` / `tiny-prior` / a local directory
/ a hub id, loading it, and sharing it.

A `BaseModel` is loaded once per process and reused for every subject: training attaches a LoRA or unfreezes
weights, and `reset()` returns it to the base weights in memory, never by reloading from storage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.diffusion.packed_lora import LoraPack
from engine.hub import PICKLE_SUFFIXES, ModelError, fingerprint
from engine.library_logging import quiet_libraries
from engine.tiny import registry
from engine.tiny.common import default_cache_dir


def resolve_base_model(name: str, cache_dir: Path | None = None) -> Path:
    """The local directory holding `name`: `tiny`, `tiny-sdxl` and `tiny-prior` are built into the cache, a hub id is
    downloaded (safetensors only)."""
    if name in registry.BASE_MODELS:
        return registry.BASE_MODELS[name](cache_dir)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{name}: not a diffusers pipeline directory (no model_index.json)")
        check_safetensors_only(path)
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"{name}: no such directory, and not a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            name,
            cache_dir=str(cache_dir or default_cache_dir() / "hub"),
            # Pickled weights are never fetched, so they can never be loaded. Only the components' folders: SDXL's
            # repository also holds single-file checkpoints at its root (~14 GB) that diffusers' layout never reads.
            allow_patterns=["*.json", "*.txt", "*.model", "*/*.safetensors"],
            ignore_patterns=["*.fp16.*", "*.non_ema.*", "*.ema.*"],
        )
    except Exception as err:
        raise ModelError(f"{name}: cannot fetch from the hub ({type(err).__name__}: {err})") from None
    path = Path(local)
    check_safetensors_only(path)
    return path


def pipeline_index(path: Path) -> dict:
    """The pipeline's model_index.json: its `_class_name` says which kind of Stable Diffusion it is."""
    try:
        return json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read model_index.json ({err})") from None


def is_sdxl_index(index: dict) -> bool:
    """StableDiffusionXLPipeline and its img2img/inpainting siblings share SDXL's components."""
    return str(index.get("_class_name", "")).startswith("StableDiffusionXL")


def check_safetensors_only(path: Path) -> None:
    """Refuse a component that only ships pickled weights: loading a pickle can run arbitrary code."""
    sdxl = is_sdxl_index(pipeline_index(path))
    for component in ("unet", "vae", "text_encoder", *(["text_encoder_2"] if sdxl else [])):
        folder = path / component
        if not folder.is_dir():
            raise ModelError(f"{path}: missing component folder '{component}'")
        if not any(folder.glob("*.safetensors")):
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            reason = f"only pickled weights ({', '.join(pickles)}), which dreamfleet never loads" if pickles else "no weights"
            raise ModelError(f"{folder}: {reason}; convert them to safetensors")


@dataclass
class BaseModel:
    """The components of a Stable Diffusion 1.x/2.x or XL model, loaded once and shared by every subject of a process.

    SDXL (model_index.json's `_class_name`, read at loading) has a second tokenizer and text encoder (`tokenizer_2`,
    `text_encoder_2`; None for SD 1.x/2.x); code that treats every text encoder alike loops over `text_encoder_names`.
    """

    path: Path
    fingerprint: str
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    device: torch.device
    index: dict = field(default_factory=dict)  # model_index.json: the pipeline class and its options
    tokenizer_2: object | None = None
    text_encoder_2: torch.nn.Module | None = None
    # The frozen UNet and text encoders are stored in the training precision on a GPU (bf16 rather than fp32 cast
    # under autocast on every step); the VAE stays fp32. LoRA weights and fully fine-tuned weights train in fp32.
    weights_dtype: torch.dtype = torch.float32
    lora: LoraPack | None = None  # the LoRA slots attached now, if any (see engine/packed_lora.py)
    _base_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        """The text-encoder components, in the order SDXL concatenates their hidden states."""
        return ("text_encoder", "text_encoder_2") if self.is_sdxl else ("text_encoder",)

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer, self.tokenizer_2] if self.is_sdxl else [self.tokenizer]

    @property
    def pipeline_class(self) -> type:
        """The stock diffusers pipeline of this kind of model, for generation and for saving LoRA weights."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline

    def snapshot(self, component: str) -> None:
        """Keep a CPU copy of a component's base weights, so that full fine-tuning can be undone in memory."""
        if component not in self._base_state:
            module = getattr(self, component)
            self._base_state[component] = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def compile_unet(self) -> None:
        """torch.compile the UNet in place (its parameter names unchanged), once per process."""
        if not getattr(self.unet, "_compiled_call_impl", None):
            self.unet.compile()

    def reset(self) -> None:
        """Back to the base weights: take any LoRA pack off, restore fully fine-tuned weights, freeze everything."""
        if self.lora is not None:
            self.lora.detach()
            self.lora = None
        for component in ("unet", *self.text_encoder_names):
            module = getattr(self, component)
            if component in self._base_state:
                module.load_state_dict(self._base_state[component])
            module.to(self.weights_dtype)
            for param in module.parameters():
                param.grad = None
            if component == "unet":
                module.disable_gradient_checkpointing()
            else:
                module.activation_checkpointing_disable()
            module.requires_grad_(False)
            module.eval()
        self.vae.requires_grad_(False)


def load_base_model(
    path: Path, device: str | torch.device = "cpu", weights_dtype: torch.dtype = torch.float32
) -> BaseModel:
    """Load every component from `path` through from_pretrained, safetensors only, frozen; the UNet and text
    encoder(s) in `weights_dtype` (see `BaseModel.weights_dtype`), the VAE in fp32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_libraries()
    path = Path(path)
    check_safetensors_only(path)
    index = pipeline_index(path)
    device = torch.device(device)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder_2 = tokenizer_2 = None
    if is_sdxl_index(index):  # the second encoder's projection gives SDXL's pooled prompt embedding
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", use_safetensors=True
        )
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for module in [m for m in (unet, vae, text_encoder, text_encoder_2) if m is not None]:
        module.requires_grad_(False)
        module.eval()
        module.to(device, dtype=weights_dtype if module is not vae else torch.float32)
    return BaseModel(
        path=path,
        fingerprint=fingerprint(path),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=noise_scheduler,
        device=device,
        index=index,
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
        weights_dtype=weights_dtype,
    )


def frozen_weights_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype to store frozen UNet and text-encoder weights in, for training at `mixed_precision`."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
