"""A subject's own weights on the shared base model: LoRA configuration, export, and loading back for generation.

Export uses the layouts stock diffusers loads:
LoRA: `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(dir)` of the base's stock pipeline
(StableDiffusionPipeline, StableDiffusionXLPipeline: unet, text_encoder and text_encoder_2 layers; FluxPipeline,
Flux2KleinPipeline: transformer layers).
Full: `unet/` or `transformer/` (and `text_encoder/`, SDXL's `text_encoder_2/`) save_pretrained folders for
`UNet2DConditionModel.from_pretrained(dir, subfolder="unet")` and its FLUX counterparts.
LoRA weights live in the slots of a `LoraPack` (engine/packed_lora.py), so one resident model carries several
subjects at once; `BaseModel.reset()` takes them off again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from engine import storage
from engine.diffusion.base_model import BaseModel
from engine.diffusion.families import family_of
from engine.diffusion.packed_lora import LoraLayoutError, LoraPack
from engine.settings import Settings, SettingsError

LORA_FILE = "pytorch_lora_weights.safetensors"


def lora_config(base: BaseModel, settings: Settings, component: str):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.effective_lora_alpha,
        lora_dropout=0.0,  # dropout would make a packed sample's update depend on more than its own subject's RNG
        init_lora_weights="gaussian",
        target_modules=list(lora_targets(base, settings, component)),
    )


def trained_components(base: BaseModel, settings: Settings) -> list[str]:
    """The components a subject's own weights live in: the denoiser, and every text encoder when they train."""
    return [base.denoiser_name, *(base.text_encoder_names if settings.train_text_encoder else ())]


def lora_targets(base: BaseModel, settings: Settings, component: str) -> list[str]:
    """The LoRA target names in `component`: the settings', or (none set) the base family's."""
    if component != base.denoiser_name:
        return settings.text_encoder_lora_target_modules
    return settings.lora_target_modules or list(family_of(base).lora_targets)


def attach_lora_pack(base: BaseModel, settings: Settings, capacity: int) -> LoraPack:
    """`capacity` empty LoRA slots of the settings' layout on the (reset) base model."""
    if base.lora is not None:
        raise RuntimeError("a LoRA pack is already attached; reset the base model first")
    components = {c: (getattr(base, c), lora_targets(base, settings, c)) for c in trained_components(base, settings)}
    try:
        base.lora = LoraPack.attach(components, settings.lora_rank, capacity)
    except LoraLayoutError as err:  # the pack took off whatever it had wrapped before the error
        raise SettingsError(f"lora_target_modules: {err}") from None
    return base.lora


def read_lora_weights(base: BaseModel, settings: Settings, weights_uri: str) -> dict[str, dict[str, torch.Tensor]]:
    """A subject's exported LoRA file, per component, in peft's single-adapter layout; safetensors only."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    exported = load_safetensors(storage.read_bytes(storage.join(weights_uri, LORA_FILE)))
    state = {}
    for component in trained_components(base, settings):
        prefix = f"{component}."  # "text_encoder." is no prefix of "text_encoder_2."'s keys
        own = {k[len(prefix):]: v for k, v in exported.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(f"{weights_uri}: no {component} LoRA weights, but the settings say it was trained")
        if component == "transformer":  # written in peft's layout already (see _save_lora)
            state[component] = own
            continue
        to_peft = convert_unet_state_dict_to_peft if component == "unet" else convert_state_dict_to_peft
        state[component] = to_peft(own)
    return state


def load_subject_weights(base: BaseModel, settings: Settings, weights_uri: str, slot: int = 0) -> None:
    """Put a trained subject's exported weights onto the base model: full weights in place (after `base.reset()`),
    LoRA weights into `slot` of the attached pack (a pack of one is attached if there is none)."""
    if settings.mode == "full":
        base.reset()
        for component in trained_components(base, settings):
            folder = storage.join(weights_uri, component)
            files = [n for n in storage.listdir(folder) if n.endswith(".safetensors")]
            if len(files) != 1:
                raise FileNotFoundError(f"{folder}: expected one .safetensors weights file, found {files}")
            base.snapshot(component)
            getattr(base, component).load_state_dict(load_safetensors(storage.read_bytes(storage.join(folder, files[0]))))
        return
    pack = base.lora if base.lora is not None else attach_lora_pack(base, settings, capacity=1)
    try:
        pack.load_slot(slot, settings.effective_lora_alpha, read_lora_weights(base, settings, weights_uri))
    except LoraLayoutError as err:
        raise ValueError(f"{weights_uri}: {err}") from None


def export_weights(base: BaseModel, settings: Settings, dest: str, slot: int = 0) -> None:
    """Write a subject's trained weights (LoRA: pack slot `slot`; full: the trained modules themselves) to `dest`,
    any fsspec URI."""
    with tempfile.TemporaryDirectory(prefix="dreamfleet-weights-") as tmp:
        if settings.mode == "lora":
            _save_lora(base, base.lora.exported(slot), settings, Path(tmp))
        else:
            for component in trained_components(base, settings):
                getattr(base, component).save_pretrained(Path(tmp) / component, safe_serialization=True)
        storage.upload_dir(Path(tmp), dest)


def _save_lora(base: BaseModel, state: dict[str, dict[str, torch.Tensor]], settings: Settings, folder: Path) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers

    # The stock pipeline's own writer, so its loader reads the file: `<component>_lora_layers` for each component,
    # and the rank and alpha in `<component>_lora_adapter_metadata`, so stock diffusers scales it as it was trained.
    kwargs = {}
    for component in trained_components(base, settings):
        # UNet bases: the diffusers layout their loaders have always read; FLUX: peft's, as diffusers' FLUX scripts write
        convert = convert_state_dict_to_diffusers if base.denoiser_name == "unet" else dict
        kwargs[f"{component}_lora_layers"] = convert(state[component])
        kwargs[f"{component}_lora_adapter_metadata"] = lora_config(base, settings, component).to_dict()
    base.pipeline_class.save_lora_weights(folder, safe_serialization=True, **kwargs)
