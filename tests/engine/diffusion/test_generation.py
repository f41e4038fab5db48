"""Generation on the resident base model: deterministic per image, batch-invariant, resumable, stock-equivalent."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.diffusion.generation import render_subject
from engine.diffusion.subject import Subject
from engine.diffusion.train import train_subject
from engine.diffusion.weights import load_subject_weights
from engine.settings import load_settings

PROMPTS = ("a photo of sks ball on grass", "a photo of sks ball in snow")


def _subject(images=("unused.png",), prompts=PROMPTS) -> Subject:
    return Subject("ball-1", tuple(images), "a photo of sks ball", "a photo of a ball", prompts=prompts, seed=11)


def _pixels(rows) -> list[np.ndarray]:
    return [np.asarray(Image.open(r["image"]), dtype=np.int16) for r in rows]


def test_same_settings_give_byte_identical_images(base, tmp_path):
    settings = load_settings("tiny", overrides={"num_images_per_prompt": 2})
    a = render_subject(base, _subject(), settings, str(tmp_path / "a"))
    b = render_subject(base, _subject(), settings, str(tmp_path / "b"))
    assert [open(r["image"], "rb").read() for r in a] == [open(r["image"], "rb").read() for r in b]
    assert len(a) == 4 and [(r["prompt_index"], r["image_index"]) for r in a] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({r["seed"] for r in a}) == 4


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "euler_a"])
def test_batch_size_does_not_change_an_image(base, tmp_path, scheduler):
    settings = load_settings("tiny", overrides={"num_images_per_prompt": 2, "scheduler": scheduler})
    one = render_subject(base, _subject(), settings.with_overrides({"generation_batch_size": 1}), str(tmp_path / "1"))
    four = render_subject(base, _subject(), settings.with_overrides({"generation_batch_size": 4}), str(tmp_path / "4"))
    for x, y in zip(_pixels(one), _pixels(four)):
        assert np.abs(x - y).max() <= 1  # the same starting noise per image; only kernel rounding differs


def test_schedulers_and_negative_prompts_change_the_images(base, tmp_path):
    settings = load_settings("tiny", overrides={"num_images_per_prompt": 1})
    variants = [
        settings,
        settings.with_overrides({"scheduler": "euler_a"}),
        settings.with_overrides({"negative_prompt": "blurry"}),
    ]
    images = [_pixels(render_subject(base, _subject(), s, str(tmp_path / str(i))))[0] for i, s in enumerate(variants)]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])


def test_png_text_chunks_carry_the_generation_parameters(base, tmp_path):
    settings = load_settings("tiny", overrides={"num_images_per_prompt": 1, "guidance_scale": 5.0})
    row = render_subject(base, _subject(), settings, str(tmp_path))[0]
    text = Image.open(row["image"]).text
    assert text["prompt"] == PROMPTS[0] and text["seed"] == str(row["seed"])
    assert (text["guidance_scale"], text["scheduler"], text["num_inference_steps"]) == ("5.0", "ddim", "10")


def test_resuming_renders_only_the_missing_images(base, tmp_path):
    settings = load_settings("tiny", overrides={"num_images_per_prompt": 2})
    rows = render_subject(base, _subject(), settings, str(tmp_path))
    first = open(rows[3]["image"], "rb").read()
    stamps = {r["image"]: __import__("os").stat(r["image"]).st_mtime_ns for r in rows}
    __import__("os").remove(rows[3]["image"])
    again = render_subject(base, _subject(), settings, str(tmp_path))
    assert again == rows
    assert all(__import__("os").stat(r["image"]).st_mtime_ns == stamps[r["image"]] for r in rows[:3])
    assert open(rows[3]["image"], "rb").read() == first


def test_no_prompts_means_no_images(base, tmp_path):
    assert render_subject(base, _subject(prompts=()), load_settings("tiny"), str(tmp_path)) == []


@pytest.mark.parametrize("overrides", [{"mode": "lora", "train_text_encoder": True}, {"mode": "full"}], ids=["lora", "full"])
def test_loaded_subject_weights_render_like_stock_diffusers(base, tiny_path, subject_images, tmp_path, overrides):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    settings = load_settings("tiny", overrides={"max_train_steps": 5, "with_prior_preservation": False,
                                                "num_images_per_prompt": 1, **overrides})  # fmt: skip
    result = train_subject(base, _subject(subject_images), settings, str(tmp_path / "s"))
    before = _pixels(render_subject(base, _subject(), settings, str(tmp_path / "before")))
    load_subject_weights(base, settings, result.weights_uri)
    ours = render_subject(base, _subject(), settings, str(tmp_path / "ours"))
    base.reset()

    stock = StableDiffusionPipeline.from_pretrained(tiny_path, safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    if settings.mode == "lora":
        stock.load_lora_weights(result.weights_uri)
    else:
        stock.unet = UNet2DConditionModel.from_pretrained(result.weights_uri, subfolder="unet")
    from engine.diffusion.unet import make_scheduler

    stock.scheduler = make_scheduler("ddim", stock.scheduler.config)
    import torch

    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(ours[0]["seed"]))
    reference = stock(PROMPTS[0], num_inference_steps=10, guidance_scale=7.5, height=32, width=32, latents=latents).images[0]
    assert np.abs(np.asarray(reference, dtype=np.int16) - _pixels(ours)[0]).max() <= 1
    assert np.abs(before[0] - _pixels(ours)[0]).mean() > 0.5  # and the subject's weights did change the image


@pytest.mark.parametrize("overrides", [{}, {"train_text_encoder": True}], ids=["lora", "lora+text-encoder"])
def test_packed_rendering_equals_each_subject_alone(base, subject_images, tmp_path, overrides):
    """Three subjects in shared UNet batches (both CFG halves of each image through its own adapter): every image
    within 1/255 of the subject rendered alone."""
    from engine.diffusion.generation import RenderJob, render_pack
    from engine.diffusion.weights import attach_lora_pack

    settings = load_settings("tiny", overrides={"max_train_steps": 6, "learning_rate": 2e-2, "num_images_per_prompt": 2,
                                                "with_prior_preservation": False, "generation_batch_size": 5,
                                                **overrides})  # fmt: skip
    subjects = [Subject(f"s{i}", tuple(subject_images[i:]), "a photo of sks ball", prompts=PROMPTS, seed=i) for i in range(3)]
    weights = [train_subject(base, s, settings, str(tmp_path / "train" / s.subject_id)).weights_uri for s in subjects]

    alone = {}
    for subject, uri in zip(subjects, weights):
        load_subject_weights(base, settings, uri)
        alone[subject.subject_id] = _pixels(render_subject(base, subject, settings, str(tmp_path / "alone" / subject.subject_id)))
        base.reset()
    attach_lora_pack(base, settings, capacity=3)
    for slot, uri in enumerate(weights):
        load_subject_weights(base, settings, uri, slot=slot)
    jobs = [RenderJob(s, settings, str(tmp_path / "packed" / s.subject_id), slot) for slot, s in enumerate(subjects)]
    packed = render_pack(base, jobs)  # 12 images in batches of 5: every batch mixes subjects
    base.reset()
    base_images = _pixels(render_subject(base, subjects[0], settings, str(tmp_path / "base")))

    for subject in subjects:
        rows = packed[subject.subject_id]
        assert len(rows) == 4
        for ours, theirs in zip(_pixels(rows), alone[subject.subject_id]):
            assert np.abs(ours - theirs).max() <= 1
    # the adapters really are applied, each its own
    assert np.abs(_pixels(packed["s0"])[0] - base_images[0]).mean() > 0.5
