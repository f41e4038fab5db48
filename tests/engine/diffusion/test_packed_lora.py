"""LoRA packs: a layout refused part-way leaves the model as it was."""

from __future__ import annotations

import pytest

from engine.diffusion.base_model import load_base_model, resolve_base_model
from engine.diffusion.packed_lora import LoraLayoutError, LoraPack, RoutedLoraLinear


def test_a_layout_refused_part_way_takes_off_what_it_had_wrapped(model_cache):
    """The transformer's targets wrap, then the text encoder's match nothing: the transformer is bare again (before,
    its routed layers stayed behind and every later pack on the worker failed on them)."""
    base = load_base_model(resolve_base_model("tiny-flux", model_cache))
    components = {"transformer": (base.transformer, ["attn.to_q"]), "text_encoder": (base.text_encoder, ["nowhere"])}
    with pytest.raises(LoraLayoutError, match=r"text_encoder: no layer matches the LoRA targets \['nowhere'\]"):
        LoraPack.attach(components, rank=2, capacity=2)
    assert not any(isinstance(m, RoutedLoraLinear) for m in base.transformer.modules())
    LoraPack.attach({"transformer": (base.transformer, ["attn.to_q"])}, rank=2, capacity=2).detach()  # attaches again
