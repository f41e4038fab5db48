"""Training helpers shared by the engine tests: stopping a run as a kill would, and the packed-equals-alone check."""

from __future__ import annotations

import torch

# Packed against alone (README, "Packing changes nothing a subject ends with"): measured 5e-7 and 3e-4.
PACK_LOSS_TOLERANCE, PACK_WEIGHT_TOLERANCE = 1e-5, 2e-3


class Interrupted(Exception):
    """Raised from a step callback to stop training as a kill would, after that step's checkpoint (if any)."""


def stop_at(step: int):
    """A step callback that raises Interrupted once training reaches `step`."""

    def on_step(record):
        if record.step == step:
            raise Interrupted

    return on_step


def lora_weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{result.weights_uri}/pytorch_lora_weights.safetensors")


def assert_same_training(alone, packed) -> None:
    assert len(alone.losses) == len(packed.losses)
    assert max(abs(a - b) for a, b in zip(alone.losses, packed.losses)) <= PACK_LOSS_TOLERANCE
    a, b = lora_weights(alone), lora_weights(packed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= PACK_WEIGHT_TOLERANCE
