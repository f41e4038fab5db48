"""The one list of offline tiny models: each name a user may pass (`--base-model`, `--vlm-model`, the eval models)
and the function that builds it into the cache on first use."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from engine.tiny.eval_models import ensure_tiny_eval_model
from engine.tiny.flux import ensure_tiny_flux, ensure_tiny_flux2
from engine.tiny.flux_prior import ensure_tiny_flux_prior
from engine.tiny.prior import ensure_tiny_prior
from engine.tiny.sd import ensure_tiny_sd, ensure_tiny_sdxl
from engine.tiny.vlm import ensure_tiny_vlm

Ensure = Callable[[Path | None], Path]  # cache dir (None: the default) -> the built model's folder

BASE_MODELS: dict[str, Ensure] = {
    "tiny": ensure_tiny_sd,
    "tiny-sdxl": ensure_tiny_sdxl,
    "tiny-prior": ensure_tiny_prior,
    "tiny-flux": ensure_tiny_flux,
    "tiny-flux2": ensure_tiny_flux2,
    "tiny-flux-prior": ensure_tiny_flux_prior,
}
VLMS: dict[str, Ensure] = {
    "tiny": partial(ensure_tiny_vlm, variant="dense"),
    "tiny-moe": partial(ensure_tiny_vlm, variant="moe"),
    "tiny-thinking": partial(ensure_tiny_vlm, variant="dense-thinking"),
    "tiny-moe-thinking": partial(ensure_tiny_vlm, variant="moe-thinking"),
}
EVAL_MODELS: dict[str, Ensure] = {  # keyed by the evaluation model's kind; the setting's value is `tiny`
    "dino": partial(ensure_tiny_eval_model, "dino"),
    "clip": partial(ensure_tiny_eval_model, "clip"),
}
