"""A trained subject's final weights, written in the layouts stock diffusers loads.

LoRA: `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(dir)`.
Full: `unet/` (and `text_encoder/`) save_pretrained folders for `UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from engine import storage
from engine.models import LORA_ADAPTER, BaseModel
from engine.settings import Settings


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
