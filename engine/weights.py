"""A subject's own weights on the shared base model: LoRA configuration, export, and loading back for generation.

Export uses the layouts stock diffusers loads:
LoRA: `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(dir)`.
Full: `unet/` (and `text_encoder/`) save_pretrained folders for `UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`.
Loading puts them onto the resident base model in memory; `BaseModel.reset()` takes them off again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors.torch import load as load_safetensors

from engine import storage
from engine.models import LORA_ADAPTER, BaseModel
from engine.settings import Settings

LORA_FILE = "pytorch_lora_weights.safetensors"


def lora_config(settings: Settings, component: str):
    from peft import LoraConfig

    targets = settings.lora_target_modules if component == "unet" else settings.text_encoder_lora_target_modules
    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.effective_lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )


def lora_components(settings: Settings) -> list[str]:
    return ["unet", "text_encoder"] if settings.train_text_encoder else ["unet"]


def load_subject_weights(base: BaseModel, settings: Settings, weights_uri: str) -> None:
    """Put a trained subject's exported weights onto the base model (after `base.reset()`), safetensors only."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    to_peft = {"unet": convert_unet_state_dict_to_peft, "text_encoder": convert_state_dict_to_peft}

    base.reset()
    if settings.mode == "full":
        for component in ["unet", *(["text_encoder"] if settings.train_text_encoder else [])]:
            folder = storage.join(weights_uri, component)
            files = [n for n in storage.listdir(folder) if n.endswith(".safetensors")]
            if len(files) != 1:
                raise FileNotFoundError(f"{folder}: expected one .safetensors weights file, found {files}")
            base.snapshot(component)
            getattr(base, component).load_state_dict(load_safetensors(storage.read_bytes(storage.join(folder, files[0]))))
        return
    exported = load_safetensors(storage.read_bytes(storage.join(weights_uri, LORA_FILE)))
    for component in lora_components(settings):
        prefix = f"{component}."
        state = {k[len(prefix):]: v for k, v in exported.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{weights_uri}: no {component} LoRA weights, but the settings say it was trained")
        base.add_lora(component, lora_config(settings, component))
        result = set_peft_model_state_dict(
            getattr(base, component), to_peft[component](state), adapter_name=LORA_ADAPTER
        )
        if result.unexpected_keys:
            raise ValueError(f"{weights_uri}: {component} LoRA weights do not match the settings' LoRA layout")


def export_weights(base: BaseModel, settings: Settings, dest: str) -> None:
    """Write the subject's trained weights (attached to `base`) to `dest`, any fsspec URI."""
    with tempfile.TemporaryDirectory(prefix="dreamfleet-weights-") as tmp:
        if settings.mode == "lora":
            _save_lora(base, settings, Path(tmp))
        else:
            base.unet.save_pretrained(Path(tmp) / "unet", safe_serialization=True)
            if settings.train_text_encoder:
                base.text_encoder.save_pretrained(Path(tmp) / "text_encoder", safe_serialization=True)
        storage.upload_dir(Path(tmp), dest)


def _save_lora(base: BaseModel, settings: Settings, folder: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet, adapter_name=LORA_ADAPTER))
    text_layers = None
    text_metadata = None
    if settings.train_text_encoder:
        text_layers = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(base.text_encoder, adapter_name=LORA_ADAPTER)
        )
        text_metadata = base.text_encoder.peft_config[LORA_ADAPTER].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        safe_serialization=True,
        # rank and alpha travel with the weights, so stock diffusers scales the LoRA as it was trained
        unet_lora_adapter_metadata=base.unet.peft_config[LORA_ADAPTER].to_dict(),
        text_encoder_lora_adapter_metadata=text_metadata,
    )
