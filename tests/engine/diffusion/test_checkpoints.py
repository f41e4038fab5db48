import json
import pickle
from pathlib import Path

import pytest
import torch

from engine import storage
from engine.diffusion.checkpoints import (
    CheckpointError,
    TrainingState,
    complete_steps,
    load_latest_checkpoint,
    save_checkpoint,
)


def _state(step: int) -> TrainingState:
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.sum().backward()
    optimizer.step()
    return TrainingState(
        step=step,
        trainable={"unet.w": param.detach().clone()},
        optimizer=optimizer.state_dict(),
        lr_scheduler={"last_epoch": step},
        rng={"generator": torch.Generator().manual_seed(step).get_state()},
        extra={"log": [{"step": step}]},
    )


def test_round_trip_restores_every_tensor_and_value(tmp_path):
    saved = _state(10)
    save_checkpoint(str(tmp_path), saved, keep=2)
    loaded = load_latest_checkpoint(str(tmp_path))
    assert loaded.step == 10 and loaded.extra == saved.extra and loaded.lr_scheduler == {"last_epoch": 10}
    assert torch.equal(loaded.trainable["unet.w"], saved.trainable["unet.w"])
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], saved.optimizer["state"][0]["exp_avg"])
    assert torch.equal(loaded.rng["generator"], saved.rng["generator"])
    param = torch.nn.Parameter(torch.zeros(3, 2))
    torch.optim.AdamW([param], lr=0.1).load_state_dict(loaded.optimizer)  # loads into a real optimizer


def test_only_the_newest_k_are_kept(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(str(tmp_path), _state(step), keep=2)
    assert complete_steps(str(tmp_path)) == [20, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020", "step-00000030"]


def test_a_checkpoint_without_its_state_file_is_ignored(tmp_path):
    save_checkpoint(str(tmp_path), _state(10), keep=3)
    save_checkpoint(str(tmp_path), _state(20), keep=3)
    (tmp_path / "step-00000020" / "state.json").unlink()  # killed before the commit
    assert load_latest_checkpoint(str(tmp_path)).step == 10
    # Training goes on from step 10; the next save replaces the incomplete folder and removes any older leftover.
    (tmp_path / "step-00000015").mkdir()
    save_checkpoint(str(tmp_path), _state(20), keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010", "step-00000020"]
    assert all((p / "state.json").exists() for p in tmp_path.iterdir())


def test_checkpoints_work_on_an_object_store_style_filesystem():
    save_checkpoint("memory://ckpt-test", _state(5), keep=1)
    assert load_latest_checkpoint("memory://ckpt-test").step == 5
    assert storage.exists("memory://ckpt-test/step-00000005/state.json")


class _Payload:
    """Unpickling this would create a file: proof that a loader unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_a_checkpoint_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(str(marker)))
    folder = Path(save_checkpoint(str(tmp_path / "ckpt"), _state(10), keep=1))
    (folder / "trainable.safetensors").write_bytes(payload)  # a pickle under a safetensors name
    state = json.loads((folder / "state.json").read_text())
    state["files"]["trainable.safetensors"] = len(payload)
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="trainable.safetensors: not a safetensors file .* not unpickled"):
        load_latest_checkpoint(str(tmp_path / "ckpt"))

    (folder / "optimizer.pt").write_bytes(payload)  # a state.json that names a pickle file
    state["files"]["optimizer.pt"] = len(payload)
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="optimizer.pt: only safetensors files are loaded"):
        load_latest_checkpoint(str(tmp_path / "ckpt"))
    assert not marker.exists()
