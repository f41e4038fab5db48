"""The base Stable Diffusion model: resolving `tiny` / a local directory / a hub id, loading it, and sharing it.

A `BaseModel` is loaded once per process and reused for every subject: training attaches a LoRA or unfreezes
weights, and `reset()` returns it to the base weights in memory, never by reloading from storage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from engine.library_logging import quiet_libraries
from engine.tiny_models import default_cache_dir, ensure_tiny_sd

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
COMPONENTS = ("unet", "vae", "text_encoder")
LORA_ADAPTER = "dreamfleet"


class ModelError(ValueError):
    """The base model cannot be found or is unsafe to load; the message says which and why."""


def resolve_base_model(name: str, cache_dir: Path | None = None) -> Path:
    """The local directory holding `name`: `tiny` is built into the cache, a hub id is downloaded (safetensors only)."""
    if name == "tiny":
        return ensure_tiny_sd(cache_dir)
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
            # Pickled weights are never fetched, so they can never be loaded.
            allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"],
            ignore_patterns=["*.fp16.*", "*.non_ema.*", "*.ema.*"],
        )
    except Exception as err:
        raise ModelError(f"{name}: cannot fetch from the hub ({type(err).__name__}: {err})") from None
    path = Path(local)
    check_safetensors_only(path)
    return path


def check_safetensors_only(path: Path) -> None:
    """Refuse a component that only ships pickled weights: loading a pickle can run arbitrary code."""
    for component in COMPONENTS:
        folder = path / component
        if not folder.is_dir():
            raise ModelError(f"{path}: missing component folder '{component}'")
        if not any(folder.glob("*.safetensors")):
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            reason = f"only pickled weights ({', '.join(pickles)}), which dreamfleet never loads" if pickles else "no weights"
            raise ModelError(f"{folder}: {reason}; convert them to safetensors")


@lru_cache(maxsize=8)
def fingerprint(path: Path) -> str:
    """A content fingerprint of a model directory, the same on every node, without reading whole weight files."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}:{size}:".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                digest.update(f.read())
    return digest.hexdigest()[:16]


@dataclass
class BaseModel:
    """The components of a Stable Diffusion 1.x/2.x model, loaded once and shared by every subject of a process."""

    path: Path
    fingerprint: str
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    device: torch.device
    _base_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def snapshot(self, component: str) -> None:
        """Keep a CPU copy of a component's base weights, so that full fine-tuning can be undone in memory."""
        if component not in self._base_state:
            module = getattr(self, component)
            self._base_state[component] = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def add_lora(self, component: str, config) -> None:
        """Inject a trainable LoRA adapter into `component` in place (peft's functional API, as diffusers uses it)."""
        from peft.functional import inject_adapter_in_model

        module = getattr(self, component)
        inject_adapter_in_model(config, module, adapter_name=LORA_ADAPTER)
        module.peft_config = {LORA_ADAPTER: config}  # where peft's state-dict helpers look for it

    def reset(self) -> None:
        """Back to the base weights: drop any LoRA adapter, restore fully fine-tuned weights, freeze everything."""
        for component in ("unet", "text_encoder"):
            module = getattr(self, component)
            if LORA_ADAPTER in (getattr(module, "peft_config", None) or {}):
                _unwrap_lora(module)
                del module.peft_config
            if component in self._base_state:
                module.load_state_dict(self._base_state[component])
            for param in module.parameters():
                param.grad = None
            if component == "unet":
                module.disable_gradient_checkpointing()
            else:
                module.activation_checkpointing_disable()
            module.requires_grad_(False)
            module.eval()
        self.vae.requires_grad_(False)


def _unwrap_lora(model: torch.nn.Module) -> None:
    """Put each LoRA-wrapped layer's original module back in its place: the model is the base model again,
    parameter names included, so a later full fine-tune exports the names stock diffusers expects."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())


def load_base_model(path: Path, device: str | torch.device = "cpu") -> BaseModel:
    """Load every component from `path` through from_pretrained, safetensors only, frozen, in fp32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_libraries()
    path = Path(path)
    check_safetensors_only(path)
    device = torch.device(device)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    return BaseModel(
        path=path,
        fingerprint=fingerprint(path),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=noise_scheduler,
        device=device,
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
