"""The training loop on the tiny model: it learns, resumes exactly, and exports weights stock diffusers loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.checkpoints import CheckpointError, complete_steps
from engine.class_images import ClassImageCache
from engine.instance_data import load_pixels
from engine.models import load_base_model
from engine.settings import load_settings
from engine.subject import Subject
from engine.train import NonFiniteLossError, train_subject

PROMPT, CLASS_PROMPT = "a photo of sks ball", "a photo of a ball"


def _subject(images: list[str]) -> Subject:
    return Subject("ball-1", tuple(images), PROMPT, CLASS_PROMPT, seed=7)


def _class_images(base, settings, tmp_path) -> list[str]:
    return ClassImageCache(str(tmp_path / "class_images")).ensure(base, CLASS_PROMPT, settings).uris


class _Interrupt(Exception):
    pass


def _stop_at(step: int):
    def on_step(record):
        if record.step == step:
            raise _Interrupt

    return on_step


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_killed_and_resumed_training_equals_uninterrupted(base, subject_images, tmp_path, mode):
    settings = load_settings("tiny", overrides={"mode": mode, "max_train_steps": 12, "checkpointing_steps": 6})
    class_uris = _class_images(base, settings, tmp_path)
    straight = train_subject(base, _subject(subject_images), settings, str(tmp_path / "straight"), class_uris)

    with pytest.raises(_Interrupt):
        train_subject(base, _subject(subject_images), settings, str(tmp_path / "resumed"), class_uris, _stop_at(6))
    resumed = train_subject(base, _subject(subject_images), settings, str(tmp_path / "resumed"), class_uris)

    assert resumed.resumed_from == 6
    assert resumed.losses == straight.losses  # bit-for-bit: same data order, noise, optimizer and LR state
    a = (tmp_path / "straight" / "checkpoints" / "step-00000012" / "trainable.safetensors").read_bytes()
    b = (tmp_path / "resumed" / "checkpoints" / "step-00000012" / "trainable.safetensors").read_bytes()
    assert a == b


def test_an_interrupted_subject_redoes_at_most_one_checkpoint_interval(base, subject_images, tmp_path):
    settings = load_settings("tiny", overrides={"max_train_steps": 10, "checkpointing_steps": 4})
    class_uris = _class_images(base, settings, tmp_path)
    steps_run = []
    with pytest.raises(_Interrupt):
        train_subject(base, _subject(subject_images), settings, str(tmp_path / "s"), class_uris, _stop_at(7))
    result = train_subject(
        base, _subject(subject_images), settings, str(tmp_path / "s"), class_uris, lambda r: steps_run.append(r.step)
    )
    assert result.resumed_from == 4 and steps_run == [5, 6, 7, 8, 9, 10]
    assert complete_steps(str(tmp_path / "s" / "checkpoints")) == [8, 10]  # keeps the newest two


def test_resuming_with_other_settings_is_refused(base, subject_images, tmp_path):
    settings = load_settings("tiny", overrides={"max_train_steps": 4, "checkpointing_steps": 2})
    class_uris = _class_images(base, settings, tmp_path)
    with pytest.raises(_Interrupt):
        train_subject(base, _subject(subject_images), settings, str(tmp_path / "s"), class_uris, _stop_at(2))
    changed = settings.with_overrides({"lora_rank": 2})
    with pytest.raises(CheckpointError, match="other training settings"):
        train_subject(base, _subject(subject_images), changed, str(tmp_path / "s"), class_uris)


def _stock_pipeline(tiny_path, weights=None, mode="lora"):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if weights and mode == "lora":
        pipe.load_lora_weights(weights)
    elif weights:
        pipe.unet = UNet2DConditionModel.from_pretrained(weights, subfolder="unet")
    return pipe


def _render(pipe, prompt: str, n: int = 8) -> np.ndarray:
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    images = pipe([prompt] * n, num_inference_steps=20, height=32, width=32, generator=generators, output_type="np")
    return images.images * 255.0


@pytest.mark.parametrize(
    "overrides",
    [
        {"mode": "lora"},
        {"mode": "lora", "train_text_encoder": True, "gradient_accumulation_steps": 2, "gradient_checkpointing": True},
        {"mode": "full", "with_prior_preservation": False, "lr_scheduler": "cosine", "lr_warmup_steps": 2},
    ],
    ids=["lora", "lora+text-encoder+accumulation+checkpointing", "full+cosine"],
)
def test_stock_diffusers_loads_the_weights_and_they_change_its_output(base, tiny_path, subject_images, tmp_path, overrides):
    settings = load_settings("tiny", overrides={"max_train_steps": 8, **overrides})
    class_uris = _class_images(base, settings, tmp_path) if settings.with_prior_preservation else None
    result = train_subject(base, _subject(subject_images), settings, str(tmp_path / "s"), class_uris)
    before = _render(_stock_pipeline(tiny_path), PROMPT, n=2)
    after = _render(_stock_pipeline(tiny_path, result.weights_uri, settings.mode), PROMPT, n=2)
    assert np.abs(after - before).mean() > 0.5
    if settings.mode == "lora" and settings.train_text_encoder:
        from safetensors.torch import load_file

        keys = load_file(f"{result.weights_uri}/pytorch_lora_weights.safetensors").keys()
        assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)


def test_the_base_model_is_left_unchanged_after_a_subject(base, subject_images, tmp_path):
    from engine.generation import generate

    settings = load_settings("tiny", overrides={"max_train_steps": 3, "with_prior_preservation": False})
    before = generate(base, [PROMPT] * 2, [1, 2], settings, batch_size=2)
    names = [name for name, _ in base.unet.named_parameters()]
    for overrides in ({"mode": "lora", "train_text_encoder": True}, {"mode": "full", "train_text_encoder": True}):
        train_subject(base, _subject(subject_images), settings.with_overrides(overrides), str(tmp_path / overrides["mode"]))
        after = generate(base, [PROMPT] * 2, [1, 2], settings, batch_size=2)
        assert [im.tobytes() for im in after] == [im.tobytes() for im in before]
        assert [name for name, _ in base.unet.named_parameters()] == names
    assert not any(p.requires_grad for p in [*base.unet.parameters(), *base.text_encoder.parameters()])


def test_latents_and_frozen_prompt_embeddings_are_computed_once(base, subject_images, tmp_path):
    settings = load_settings("tiny", overrides={"max_train_steps": 10})
    class_uris = _class_images(base, settings, tmp_path)
    calls = {"vae": 0, "text": 0}
    hooks = [
        base.vae.encoder.register_forward_hook(lambda *a: calls.__setitem__("vae", calls["vae"] + 1)),
        base.text_encoder.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1)),
    ]
    try:
        train_subject(base, _subject(subject_images), settings, str(tmp_path / "s"), class_uris)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"vae": 2, "text": 2}  # one batch of instance + one of class images; two prompts


def test_a_non_finite_loss_fails_the_subject_with_the_step(tiny_path, subject_images, tmp_path):
    broken = load_base_model(tiny_path)
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    settings = load_settings("tiny", overrides={"max_train_steps": 3, "with_prior_preservation": False})
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        train_subject(broken, _subject(subject_images), settings, str(tmp_path / "s"))


def test_an_undecodable_instance_image_names_its_uri(base, subject_images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    settings = load_settings("tiny", overrides={"max_train_steps": 2, "with_prior_preservation": False})
    with pytest.raises(ValueError, match="broken.jpg: the file is truncated"):
        train_subject(base, _subject([*subject_images, str(bad)]), settings, str(tmp_path / "s"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_learns_the_subject(base, tiny_path, subject_images, tmp_path, mode):
    """Loss falls, and generations for the instance prompt move towards the subject.

    The tiny VAE is random, so "the subject" is measured as it looks through that VAE (encode then decode): the
    closest any generation of this model could get to it.
    """
    settings = load_settings("tiny", overrides={"mode": mode})
    class_uris = _class_images(base, settings, tmp_path)
    result = train_subject(base, _subject(subject_images), settings, str(tmp_path / "s"), class_uris)
    assert np.mean(result.losses[-10:]) < 0.8 * np.mean(result.losses[:10])

    with torch.no_grad():
        pixels = load_pixels(subject_images, settings)
        seen = base.vae.decode(base.vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    target = ((seen + 1) * 127.5).permute(0, 2, 3, 1).numpy().mean(0)

    def distance(images: np.ndarray) -> float:
        return float(np.abs(images - target).mean())

    untrained = distance(_render(_stock_pipeline(tiny_path), PROMPT))
    trained = distance(_render(_stock_pipeline(tiny_path, result.weights_uri, mode), PROMPT))
    assert trained < 0.93 * untrained, (trained, untrained)
