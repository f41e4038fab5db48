"""Several subjects' LoRA adapters on one resident model, each sample of a batch routed through its own subject's.

`LoraPack.attach` wraps every target Linear of the UNet (and, when it trains, the text encoder) once, with room
for `capacity` adapters ("slots"). Before a forward pass the caller sets a route: one slot number per sample. The
frozen base layer then runs once for the whole batch, and the low-rank updates of all samples are two batched
matmuls over per-sample gathered A and B matrices, so K subjects cost one UNet pass, not K.

Why not peft's mixed-adapter forward (`adapter_names`): it runs only at inference (PeftModel refuses it in training
mode and a diffusers UNet is not a PeftModel), and it loops over the adapters with a sub-batch each.

A slot's parameters are named as peft names a single adapter's (`<layer>.lora_A.<adapter>.weight`) and are
initialised as peft's "gaussian" init does, so checkpoints and exported weights keep the layout stock diffusers
loads. Each slot has its own parameters: an optimizer over one slot's parameters sees only that subject.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

ADAPTER_NAME = "dreamfleet"  # the adapter name in parameter names, as the peft-based trainer had it


class LoraLayoutError(ValueError):
    """The settings' LoRA targets do not fit the model (nothing matched, or a matched layer is not Linear)."""


@dataclass
class Route:
    """The slot of each sample in the batch now going through the model, and each sample's LoRA scale."""

    slots: torch.Tensor | None = None
    scales: torch.Tensor | None = None


class RoutedLoraLinear(nn.Module):
    """A frozen Linear plus `capacity` LoRA adapters; `route` picks one per sample."""

    def __init__(self, base_layer: nn.Linear, rank: int, capacity: int, route: Route):
        super().__init__()
        self.base_layer = base_layer
        self.route = route
        device = base_layer.weight.device
        # fp32 always: these are the trained (master) weights, whatever dtype the frozen base is stored in
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.zeros(rank, base_layer.in_features, device=device), requires_grad=False)
            for _ in range(capacity)
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(base_layer.out_features, rank, device=device), requires_grad=False)
            for _ in range(capacity)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        slots = self.route.slots
        if slots is None:
            return out
        n = x.shape[0]
        if slots.numel() != n:
            raise RuntimeError(f"a batch of {n} samples reached a LoRA layer routed for {slots.numel()}")
        a = torch.stack(tuple(self.lora_A))[slots].to(x.dtype)  # [n, r, in]
        b = torch.stack(tuple(self.lora_B))[slots].to(x.dtype)  # [n, out, r]
        h = x.reshape(n, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))
        delta = delta * self.route.scales.to(delta.dtype)[:, None, None]
        return out + delta.reshape(out.shape).to(out.dtype)


def _matches(name: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of target names: the module's full name is one, or ends with '.' + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclass
class LoraPack:
    """The routed adapters of one model: slots on each wrapped component, and the route they share."""

    rank: int
    capacity: int
    layers: dict[str, dict[str, RoutedLoraLinear]]  # component -> layer name -> routed layer
    modules: dict[str, nn.Module]  # component -> the module wrapped
    routes: dict[str, Route]  # component -> the route of the batch going through it
    scales: list[float] = field(default_factory=list)  # alpha / rank of each slot

    @classmethod
    def attach(
        cls, components: dict[str, tuple[nn.Module, Sequence[str]]], rank: int, capacity: int
    ) -> LoraPack:
        """Wrap the target Linears of each component (name -> (module, target names)) with `capacity` slots."""
        routes = {component: Route() for component in components}
        modules = {component: module for component, (module, _) in components.items()}
        pack = cls(rank, capacity, {}, modules, routes, [0.0] * capacity)
        try:
            for component, (module, targets) in components.items():
                found = [(n, m) for n, m in module.named_modules() if n and _matches(n, targets)]
                if not found:
                    raise LoraLayoutError(f"{component}: no layer matches the LoRA targets {list(targets)}")
                pack.layers[component] = {}
                for name, layer in found:
                    if type(layer) is not nn.Linear:
                        raise LoraLayoutError(
                            f"{component}.{name} is a {type(layer).__name__}; LoRA targets must be Linear layers"
                        )
                    routed = RoutedLoraLinear(layer, rank, capacity, routes[component])
                    parent_name, _, child = name.rpartition(".")
                    setattr(module.get_submodule(parent_name) if parent_name else module, child, routed)
                    pack.layers[component][name] = routed
        except LoraLayoutError:
            pack.detach()  # the layers wrapped before the error (an earlier component's, too) come off again
            raise
        return pack

    def detach(self) -> None:
        """Put every original Linear back: the model is the base model again, parameter names included."""
        for component, layers in self.layers.items():
            module = self.modules[component]
            for name, routed in layers.items():
                parent_name, _, child = name.rpartition(".")
                setattr(module.get_submodule(parent_name) if parent_name else module, child, routed.base_layer)
        self.layers = {}

    # -- slots -----------------------------------------------------------------------------------------------------

    def parameters(self, slot: int) -> dict[str, nn.Parameter]:
        """A slot's trainable parameters under peft's names, prefixed by component (`unet.<layer>.lora_A...`)."""
        params = {}
        for component, layers in self.layers.items():
            for name, layer in layers.items():
                params[f"{component}.{name}.lora_A.{ADAPTER_NAME}.weight"] = layer.lora_A[slot]
                params[f"{component}.{name}.lora_B.{ADAPTER_NAME}.weight"] = layer.lora_B[slot]
        return params

    @torch.no_grad()
    def init_slot(self, slot: int, alpha: float, generator: torch.Generator) -> None:
        """A fresh adapter in `slot`: A ~ N(0, 1/r²), B = 0 (peft's "gaussian" init), drawn from the subject's RNG."""
        for layers in self.layers.values():
            for layer in layers.values():
                a = layer.lora_A[slot]
                a.copy_(torch.randn(a.shape, generator=generator) / self.rank)
                layer.lora_B[slot].zero_()
        self._occupy(slot, alpha)

    @torch.no_grad()
    def load_slot(self, slot: int, alpha: float, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Exported weights into `slot`: per component, peft-format keys (`<layer>.lora_A.weight`)."""
        for component, layers in self.layers.items():
            weights = state.get(component)
            if not weights:
                raise LoraLayoutError(f"no {component} LoRA weights, but the settings say it was trained")
            expected = {f"{name}.lora_{ab}.weight" for name in layers for ab in "AB"}
            if set(weights) != expected:
                extra, missing = sorted(set(weights) - expected), sorted(expected - set(weights))
                raise LoraLayoutError(
                    f"{component} LoRA weights do not match the settings' LoRA layout "
                    f"(unexpected {extra[:3]}, missing {missing[:3]})"
                )
            for name, layer in layers.items():
                layer.lora_A[slot].copy_(weights[f"{name}.lora_A.weight"])
                layer.lora_B[slot].copy_(weights[f"{name}.lora_B.weight"])
        self._occupy(slot, alpha)

    def _occupy(self, slot: int, alpha: float) -> None:
        self.scales[slot] = alpha / self.rank
        for param in self.parameters(slot).values():
            param.requires_grad_(True)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        for param in self.parameters(slot).values():
            param.requires_grad_(False)
            param.grad = None
            param.zero_()

    def exported(self, slot: int) -> dict[str, dict[str, torch.Tensor]]:
        """A slot's weights per component in peft's single-adapter state-dict layout (`<layer>.lora_A.weight`)."""
        return {
            component: {
                f"{name}.lora_{ab}.weight": (layer.lora_A if ab == "A" else layer.lora_B)[slot].detach().clone()
                for name, layer in layers.items()
                for ab in "AB"
            }
            for component, layers in self.layers.items()
        }

    @property
    def device(self) -> torch.device:
        return next(iter(next(iter(self.layers.values())).values())).base_layer.weight.device

    # -- routing ---------------------------------------------------------------------------------------------------

    def route(self, component: str, slots: Sequence[int]) -> None:
        """From now on, sample i of a batch through `component` goes through slot `slots[i]`."""
        if component not in self.routes:
            return  # a component without adapters: none of its layers is wrapped
        index = torch.as_tensor(slots, dtype=torch.long)
        scales = torch.tensor(self.scales, dtype=torch.float32)[index]
        self.routes[component].slots, self.routes[component].scales = index.to(self.device), scales.to(self.device)

    def clear_routes(self) -> None:
        for route in self.routes.values():
            route.slots = route.scales = None

    @contextlib.contextmanager
    def routed(self, **slots: Sequence[int]) -> Iterator[None]:
        """Inside, sample i of a batch through component c goes through slot `slots[c][i]` (e.g. `unet=[0, 0, 1, 1]`).

        A training step keeps its routes set through the backward pass: gradient checkpointing reruns the forward.
        """
        for component, index in slots.items():
            self.route(component, index)
        try:
            yield
        finally:
            self.clear_routes()
