"""A subject's own weights on the shared base model: LoRA configuration, export, and loading back for generation.

Export uses the layouts stock diffusers loads:
LoRA: `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(dir)`.
Full: `unet/` (and `text_encoder/`) save_pretrained folders for `UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`.
LoRA weights live in the slots of a `LoraPack` (engine/packed_lora.py), so one resident model carries several
subjects at once; `BaseModel.reset()` takes them off again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from engine import storage
from engine.models import BaseModel
from engine.packed_lora import LoraLayoutError, LoraPack
from engine.settings import Settings, SettingsError

LORA_FILE = "pytorch_lora_weights.safetensors"


def lora_config(settings: Settings, component: str):
    from peft import LoraConfig

    targets = settings.lora_target_modules if component == "unet" else settings.text_encoder_lora_target_modules
    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.effective_lora_alpha,
        lora_dropout=0.0,  # dropout would make a packed sample's update depend on more than its own subject's RNG
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )


def lora_components(settings: Settings) -> list[str]:
    return ["unet", "text_encoder"] if settings.train_text_encoder else ["unet"]


def attach_lora_pack(base: BaseModel, settings: Settings, capacity: int) -> LoraPack:
    """`capacity` empty LoRA slots of the settings' layout on the (reset) base model."""
    if base.lora is not None:
        raise RuntimeError("a LoRA pack is already attached; reset the base model first")
    targets = {"unet": settings.lora_target_modules, "text_encoder": settings.text_encoder_lora_target_modules}
    components = {c: (getattr(base, c), targets[c]) for c in lora_components(settings)}
    try:
        base.lora = LoraPack.attach(components, settings.lora_rank, capacity)
    except LoraLayoutError as err:
        base.reset()  # whatever was wrapped before the error comes off again
        raise SettingsError(f"lora_target_modules: {err}") from None
    return base.lora


def read_lora_weights(settings: Settings, weights_uri: str) -> dict[str, dict[str, torch.Tensor]]:
    """A subject's exported LoRA file, per component, in peft's single-adapter layout; safetensors only."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    to_peft = {"unet": convert_unet_state_dict_to_peft, "text_encoder": convert_state_dict_to_peft}
    exported = load_safetensors(storage.read_bytes(storage.join(weights_uri, LORA_FILE)))
    state = {}
    for component in lora_components(settings):
        prefix = f"{component}."
        own = {k[len(prefix):]: v for k, v in exported.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(f"{weights_uri}: no {component} LoRA weights, but the settings say it was trained")
        state[component] = to_peft[component](own)
    return state


def load_subject_weights(base: BaseModel, settings: Settings, weights_uri: str, slot: int = 0) -> None:
    """Put a trained subject's exported weights onto the base model: full weights in place (after `base.reset()`),
    LoRA weights into `slot` of the attached pack (a pack of one is attached if there is none)."""
    if settings.mode == "full":
        base.reset()
        for component in ["unet", *(["text_encoder"] if settings.train_text_encoder else [])]:
            folder = storage.join(weights_uri, component)
            files = [n for n in storage.listdir(folder) if n.endswith(".safetensors")]
            if len(files) != 1:
                raise FileNotFoundError(f"{folder}: expected one .safetensors weights file, found {files}")
            base.snapshot(component)
            getattr(base, component).load_state_dict(load_safetensors(storage.read_bytes(storage.join(folder, files[0]))))
        return
    pack = base.lora if base.lora is not None else attach_lora_pack(base, settings, capacity=1)
    try:
        pack.load_slot(slot, settings.effective_lora_alpha, read_lora_weights(settings, weights_uri))
    except LoraLayoutError as err:
        raise ValueError(f"{weights_uri}: {err}") from None


def export_weights(base: BaseModel, settings: Settings, dest: str, slot: int = 0) -> None:
    """Write a subject's trained weights (LoRA: pack slot `slot`; full: the UNet itself) to `dest`, any fsspec URI."""
    with tempfile.TemporaryDirectory(prefix="dreamfleet-weights-") as tmp:
        if settings.mode == "lora":
            _save_lora(base.lora.exported(slot), settings, Path(tmp))
        else:
            base.unet.save_pretrained(Path(tmp) / "unet", safe_serialization=True)
            if settings.train_text_encoder:
                base.text_encoder.save_pretrained(Path(tmp) / "text_encoder", safe_serialization=True)
        storage.upload_dir(Path(tmp), dest)


def _save_lora(state: dict[str, dict[str, torch.Tensor]], settings: Settings, folder: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = {c: convert_state_dict_to_diffusers(state[c]) for c in lora_components(settings)}
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers.get("text_encoder"),
        safe_serialization=True,
        # rank and alpha travel with the weights, so stock diffusers scales the LoRA as it was trained
        unet_lora_adapter_metadata=lora_config(settings, "unet").to_dict(),
        text_encoder_lora_adapter_metadata=lora_config(settings, "text_encoder").to_dict()
        if settings.train_text_encoder else None,
    )
