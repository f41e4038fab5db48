"""Resumable training state: trainable weights, optimizer, LR schedule, RNG and step, with no pickles anywhere.

A checkpoint is a folder `checkpoints/step-00000200/` of safetensors files (every tensor) and `state.json` (every
other value). `state.json` is written last and lists the files with their sizes: a checkpoint is complete exactly
when its `state.json` exists and matches, so a kill at any moment leaves either the old or the new one usable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from engine import storage

STATE = "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume this training; the message says why."""


@dataclass
class TrainingState:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    extra: dict[str, Any]  # JSON: training log, identity of the settings it was made with, grad scaler


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _folder(checkpoints_uri: str, step: int) -> str:
    return storage.join(checkpoints_uri, f"step-{step:08d}")


def save_checkpoint(checkpoints_uri: str, state: TrainingState, keep: int) -> str:
    """Write `state` as a new checkpoint, then delete all but the newest `keep`. Returns the checkpoint's URI."""
    folder = _folder(checkpoints_uri, state.step)
    optimizer_tensors, optimizer_meta = _split_optimizer(state.optimizer)
    blobs = {
        "trainable.safetensors": save_safetensors({k: v.detach().contiguous().cpu() for k, v in state.trainable.items()}),
        "optimizer.safetensors": save_safetensors(optimizer_tensors),
        "rng.safetensors": save_safetensors(state.rng),
    }
    for name, data in blobs.items():
        storage.write_bytes(storage.join(folder, name), data)
    manifest = {
        "step": state.step,
        "files": {name: len(data) for name, data in blobs.items()},
        "optimizer": optimizer_meta,
        "lr_scheduler": state.lr_scheduler,
        "extra": state.extra,
    }
    storage.write_bytes(storage.join(folder, STATE), json.dumps(manifest).encode())
    folders = _step_folders(checkpoints_uri)
    complete = sorted(step for step, done in folders.items() if done)
    # Older than the newest `keep`, or left incomplete by a process killed while saving it.
    for old in complete[:-keep] + [step for step, done in folders.items() if not done and step < state.step]:
        storage.remove(_folder(checkpoints_uri, old))
    return folder


def _step_folders(checkpoints_uri: str) -> dict[int, bool]:
    """Each checkpoint folder's step, and whether its state.json was written (i.e. it is complete)."""
    return {
        int(name[5:]): storage.exists(storage.join(checkpoints_uri, name, STATE))
        for name in storage.listdir(checkpoints_uri)
        if name.startswith("step-") and name[5:].isdigit()
    }


def complete_steps(checkpoints_uri: str) -> list[int]:
    """Steps of the checkpoints whose state.json was written, oldest first."""
    return sorted(step for step, done in _step_folders(checkpoints_uri).items() if done)


def load_latest_checkpoint(checkpoints_uri: str) -> TrainingState | None:
    """The newest complete checkpoint, or None when there is none."""
    steps = complete_steps(checkpoints_uri)
    if not steps:
        return None
    folder = _folder(checkpoints_uri, steps[-1])
    manifest = storage.read_json(storage.join(folder, STATE))
    blobs = {}
    for name in manifest["files"]:
        if not name.endswith(".safetensors"):
            raise CheckpointError(f"{folder}/{name}: only safetensors files are loaded from a checkpoint, never pickles")
    for name, size in manifest["files"].items():
        data = storage.read_bytes(storage.join(folder, name))
        if len(data) != size:
            raise CheckpointError(f"{folder}/{name}: {len(data)} bytes, expected {size}; the checkpoint is damaged")
        try:
            blobs[name] = load_safetensors(data)
        except Exception as err:  # safetensors parses a header and raw tensors: nothing in it can run code
            raise CheckpointError(f"{folder}/{name}: not a safetensors file ({err}); it is not unpickled") from None
    return TrainingState(
        step=manifest["step"],
        trainable=blobs["trainable.safetensors"],
        optimizer=_join_optimizer(blobs["optimizer.safetensors"], manifest["optimizer"]),
        lr_scheduler=manifest["lr_scheduler"],
        rng=blobs["rng.safetensors"],
        extra=manifest["extra"],
    )
