"""Which family a loaded base belongs to (its `kind`, read from model_index.json at loading)."""

from __future__ import annotations

from pathlib import Path

from engine.diffusion.base_model import BaseModel, base_kind, pipeline_index
from engine.diffusion.family import Family
from engine.diffusion.flux import Flux2Family, FluxFamily
from engine.diffusion.unet import UNetFamily
from engine.settings import Settings

_UNET, _FLUX, _FLUX2 = UNetFamily(), FluxFamily(), Flux2Family()
FAMILIES: dict[str, Family] = {"sd": _UNET, "sdxl": _UNET, "flux": _FLUX, "flux2": _FLUX2}


def family_of(base: BaseModel) -> Family:
    return FAMILIES[base.kind]


def with_family_defaults(settings: Settings, base_path: Path) -> Settings:
    """The settings with the base family's defaults spelled out where they name none, as a run records them: a RUN's
    recorded settings then say which layers it trains, whichever version picked that default."""
    if settings.lora_target_modules is not None:
        return settings
    family = FAMILIES[base_kind(pipeline_index(base_path))]
    return settings.model_copy(update={"lora_target_modules": list(family.lora_targets)})
