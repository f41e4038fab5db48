"""Which family a loaded base belongs to (its `kind`, read from model_index.json at loading)."""

from __future__ import annotations

from engine.diffusion.base_model import BaseModel
from engine.diffusion.family import Family
from engine.diffusion.flux import Flux2Family, FluxFamily
from engine.diffusion.unet import UNetFamily

_UNET, _FLUX, _FLUX2 = UNetFamily(), FluxFamily(), Flux2Family()
FAMILIES: dict[str, Family] = {"sd": _UNET, "sdxl": _UNET, "flux": _FLUX, "flux2": _FLUX2}


def family_of(base: BaseModel) -> Family:
    return FAMILIES[base.kind]
