"""The base model (Stable Diffusion 1.x/2.x or XL, FLUX.1, FLUX.2 [klein]): resolving a tiny name / a local directory
/ a hub id, loading it, and sharing it.

A `BaseModel` is loaded once per process and reused for every subject: training attaches a LoRA or unfreezes
weights, and `reset()` returns it to the base weights in memory, never by reloading from storage.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.diffusion.packed_lora import LoraPack
from engine.hub import PICKLE_SUFFIXES, ModelError, fingerprint
from engine.library_logging import quiet_libraries
from engine.tiny import registry
from engine.tiny.common import default_cache_dir

PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline",
             "flux2": "Flux2KleinPipeline"}  # fmt: skip
# The weight-bearing component folders of each kind of base (model_index.json's pipeline class decides the kind).
COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2"),
    "flux2": ("transformer", "vae", "text_encoder"),
}


def resolve_base_model(name: str, cache_dir: Path | None = None) -> Path:
    """The local directory holding `name`: a tiny name (engine/tiny/registry.py) is built into the cache, a hub id is
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
    """The pipeline's model_index.json: its `_class_name` says which kind of base it is (see `base_kind`)."""
    try:
        return json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read model_index.json ({err})") from None


def base_kind(index: dict) -> str:
    """"sd", "sdxl", "flux" or "flux2", from the pipeline class (img2img/inpainting siblings share the components)."""
    name = str(index.get("_class_name", ""))
    if name.startswith("Flux2Klein"):
        return "flux2"
    if name.startswith("Flux2"):
        raise ModelError(f"{name}: FLUX.2 [dev] (Mistral text encoder) is not supported; FLUX.2 [klein] is")
    if name.startswith("Flux"):
        return "flux"
    return "sdxl" if name.startswith("StableDiffusionXL") else "sd"


def check_safetensors_only(path: Path) -> None:
    """Refuse a component that only ships pickled weights (loading a pickle can run arbitrary code), or is missing."""
    for component in COMPONENTS[base_kind(pipeline_index(path))]:
        folder = path / component
        if not folder.is_dir():
            raise ModelError(f"{path}: missing component folder '{component}'")
        if not any(folder.glob("*.safetensors")):
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            reason = f"only pickled weights ({', '.join(pickles)}), which dreamfleet never loads" if pickles else "no weights"
            raise ModelError(f"{folder}: {reason}; convert them to safetensors")


@dataclass
class BaseModel:
    """The components of a base model, loaded once and shared by every subject of a process.

    Its `kind` (model_index.json's `_class_name`, read at loading) says which components it has, named as its stock
    pipeline names them: a `unet` (SD, SDXL) or a `transformer` (FLUX; `denoiser` is whichever it is); SDXL and
    FLUX.1 have a second tokenizer and text encoder (`tokenizer_2`, `text_encoder_2`, else None). Code that treats
    every text encoder alike loops over `text_encoder_names`; what differs by kind is its family's
    (engine/diffusion/families.py).
    """

    path: Path
    fingerprint: str
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module | None  # SD and SDXL (None for FLUX)
    noise_scheduler: object
    device: torch.device
    index: dict = field(default_factory=dict)  # model_index.json: the pipeline class and its options
    tokenizer_2: object | None = None
    text_encoder_2: torch.nn.Module | None = None
    transformer: torch.nn.Module | None = None  # FLUX
    kind: str = "sd"  # "sd", "sdxl", "flux" or "flux2" (see `base_kind`)
    # The frozen denoiser and text encoders are stored in the training precision on a GPU (bf16 rather than fp32 cast
    # under autocast on every step); the VAE stays fp32. LoRA weights and fully fine-tuned weights train in fp32.
    weights_dtype: torch.dtype = torch.float32
    lora: LoraPack | None = None  # the LoRA slots attached now, if any (see engine/packed_lora.py)
    text_encoders_parked: bool = False  # on the CPU while a pack trains on cached prompt embeddings
    _base_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def is_sdxl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def denoiser_name(self) -> str:
        """The component that denoises, as the stock pipeline names it (and LoRA files prefix its layers)."""
        return "transformer" if self.transformer is not None else "unet"

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        """The text-encoder components, in the order SDXL concatenates their hidden states."""
        return ("text_encoder", "text_encoder_2") if self.text_encoder_2 is not None else ("text_encoder",)

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer, self.tokenizer_2] if self.text_encoder_2 is not None else [self.tokenizer]

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pipeline_class(self) -> type:
        """The stock diffusers pipeline of this kind of model, for generation and for saving LoRA weights."""
        import diffusers

        return getattr(diffusers, PIPELINES[self.kind])

    def snapshot(self, component: str) -> None:
        """Keep a CPU copy of a component's base weights, so that full fine-tuning can be undone in memory."""
        if component not in self._base_state:
            module = getattr(self, component)
            self._base_state[component] = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def compile_unet(self) -> None:
        """torch.compile the denoiser (UNet or transformer) in place (its parameter names unchanged), once per process."""
        if not getattr(self.denoiser, "_compiled_call_impl", None):
            self.denoiser.compile()

    def park_text_encoders(self) -> None:
        """Move the frozen text encoders to the CPU. A pack that trains on cached prompt embeddings runs them only when
        it admits a subject (`text_encoders_on_device`), so between admissions the device holds the denoiser and the
        VAE alone (FLUX.1's T5-XXL is ~9.5 GB in bf16, [klein]'s Qwen3 4-8 GB). `reset()` brings them back."""
        self._text_encoders_to("cpu")
        self.text_encoders_parked = True

    def _text_encoders_to(self, device: str | torch.device) -> None:
        for name in self.text_encoder_names:
            getattr(self, name).to(device)

    @contextlib.contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """The text encoders on the device for the block (an admitted subject's prompts), parked again after.

        Why not encode on the CPU instead: T5-XXL or Qwen3 takes seconds per prompt there (and bf16 matmuls are slow
        on many CPUs), while copying their weights over PCIe takes well under one each way. A subject is admitted
        between steps, when no activations are held, so the encoders share the device with the weights and
        optimizer states alone."""
        if not self.text_encoders_parked:
            yield
            return
        self._text_encoders_to(self.device)
        try:
            yield
        finally:
            self._text_encoders_to("cpu")

    def reset(self) -> None:
        """Back to the base weights: take any LoRA pack off, restore fully fine-tuned weights, freeze everything, and
        parked text encoders back on the device (class images and generation encode prompts there, as the stock
        pipelines do: their prompts are few and the denoiser holds no optimizer state then)."""
        if self.text_encoders_parked:
            self._text_encoders_to(self.device)
            self.text_encoders_parked = False
        if self.lora is not None:
            self.lora.detach()
            self.lora = None
        for component in (self.denoiser_name, *self.text_encoder_names):
            module = getattr(self, component)
            if component in self._base_state:
                module.load_state_dict(self._base_state[component])
            module.to(self.weights_dtype)
            for param in module.parameters():
                param.grad = None
            if component == self.denoiser_name:
                module.disable_gradient_checkpointing()
            else:
                text_encoder_checkpointing(module, False)
            module.requires_grad_(False)
            module.eval()
        self.vae.requires_grad_(False)


def text_encoder_checkpointing(module: torch.nn.Module, on: bool) -> None:
    """Activation checkpointing on a transformers text encoder. transformers renamed `gradient_checkpointing_*` to
    `activation_checkpointing_*` after 5.19 (the old names warn until v6); the pin allows both, and the vLLM CPU rig
    runs 5.19."""
    prefix = "activation_checkpointing" if hasattr(module, "activation_checkpointing_enable") else "gradient_checkpointing"
    getattr(module, f"{prefix}_{'enable' if on else 'disable'}")()


def load_base_model(
    path: Path, device: str | torch.device = "cpu", weights_dtype: torch.dtype = torch.float32
) -> BaseModel:
    """Load every component from `path` through from_pretrained, safetensors only, frozen; the denoiser and text
    encoder(s) in `weights_dtype` (see `BaseModel.weights_dtype`), the VAE in fp32."""
    quiet_libraries()
    path = Path(path)
    check_safetensors_only(path)
    index = pipeline_index(path)
    kind = base_kind(index)
    components = _load_components(path, kind)
    device = torch.device(device)
    for name, module in components.items():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
            module.to(device, dtype=weights_dtype if name != "vae" else torch.float32)
    return BaseModel(path=path, fingerprint=fingerprint(path), device=device, index=index, kind=kind,
                     weights_dtype=weights_dtype, unet=components.pop("unet", None), **components)  # fmt: skip


def _load_components(path: Path, kind: str) -> dict:
    """The kind's components, each from its folder with its own class (as its stock pipeline loads them)."""
    import diffusers
    import transformers

    if kind in ("sd", "sdxl"):
        classes = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
                   "text_encoder": transformers.CLIPTextModel, "tokenizer": transformers.CLIPTokenizer,
                   # the second encoder's projection gives SDXL's pooled prompt embedding
                   "text_encoder_2": transformers.CLIPTextModelWithProjection,
                   "tokenizer_2": transformers.CLIPTokenizer, "noise_scheduler": diffusers.DDPMScheduler}  # fmt: skip
    elif kind == "flux":
        classes = {"transformer": diffusers.FluxTransformer2DModel, "vae": diffusers.AutoencoderKL,
                   "text_encoder": transformers.CLIPTextModel, "tokenizer": transformers.CLIPTokenizer,
                   "text_encoder_2": transformers.T5EncoderModel, "tokenizer_2": transformers.T5TokenizerFast,
                   "noise_scheduler": diffusers.FlowMatchEulerDiscreteScheduler}  # fmt: skip
    else:
        classes = {"transformer": diffusers.Flux2Transformer2DModel, "vae": diffusers.AutoencoderKLFlux2,
                   "text_encoder": transformers.Qwen3ForCausalLM, "tokenizer": transformers.AutoTokenizer,
                   "noise_scheduler": diffusers.FlowMatchEulerDiscreteScheduler}  # fmt: skip
    if kind == "sd":
        del classes["text_encoder_2"], classes["tokenizer_2"]
    loaded = {}
    for name, cls in classes.items():
        folder = "scheduler" if name == "noise_scheduler" else name
        weights = {"use_safetensors": True} if name in COMPONENTS[kind] else {}
        loaded[name] = cls.from_pretrained(path, subfolder=folder, **weights)
    return loaded


def frozen_weights_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype to store frozen UNet and text-encoder weights in, for training at `mixed_precision`."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
