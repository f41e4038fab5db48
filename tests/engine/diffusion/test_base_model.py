import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from engine.diffusion.base_model import load_base_model, resolve_base_model
from engine.hub import ModelError, fingerprint
from engine.tiny.sd import build_tiny_sd


def test_tiny_model_is_deterministic_from_its_seed(tmp_path, tiny_path):
    build_tiny_sd(tmp_path / "again", seed=0)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(tiny_path / part), load_file(tmp_path / "again" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fingerprint(tiny_path) == fingerprint(tmp_path / "again")


def test_tiny_model_round_trips_through_stock_from_pretrained(tiny_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a ball", num_inference_steps=2, height=32, width=32, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


class _Payload:
    """Unpickling this would create a file: proof that a loader unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path, tiny_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    marker = tmp_path / "PWNED"
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ModelError, match="only pickled weights .*diffusion_pytorch_model.bin"):
        resolve_base_model(str(model))
    with pytest.raises(ModelError):
        load_base_model(model)
    assert not marker.exists()


def test_local_directory_and_bad_names(tmp_path, tiny_path):
    assert resolve_base_model(str(tiny_path)) == tiny_path
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        resolve_base_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="no such directory"):
        resolve_base_model(str(tmp_path / "missing" / "deeper"))


def test_hub_id_never_reaches_the_network_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot fetch from the hub"):
        resolve_base_model("someone/some-model", cache_dir=tmp_path)
