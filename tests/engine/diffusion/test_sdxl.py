"""SDXL bases, on the tiny SDXL model: training (LoRA, packed, full), resume and export, each loaded back by stock
StableDiffusionXLPipeline; the SD 1.x versions of these tests are in test_train.py and test_generation.py."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.diffusion.base_model import load_base_model, resolve_base_model
from engine.diffusion.class_images import ClassImageCache
from engine.diffusion.generation import render_subject
from engine.diffusion.subject import Subject
from engine.diffusion.train import PackJob, train_pack, train_subject
from engine.diffusion.unet import make_scheduler
from engine.diffusion.weights import load_subject_weights
from engine.hub import ModelError, fingerprint
from engine.settings import load_settings
from engine.tiny.sd import build_tiny_sdxl
from tests.helpers.subjects import draw_subject
from tests.helpers.training import Interrupted, assert_same_training, stop_at

PROMPT, CLASS_PROMPT = "a photo of sks ball", "a photo of a ball"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are too small to gain from intra-op threads, and on a shared CPU two threads contending
    with other processes made a 6-step subject 20-48x slower (1.0 s alone vs 19-48 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sdxl_path(model_cache):
    return resolve_base_model("tiny-sdxl", model_cache)


@pytest.fixture(scope="module")
def sdxl(sdxl_path):
    """One resident SDXL base model for the module's tests, as a fleet worker shares it between subjects."""
    return load_base_model(sdxl_path, "cpu")


def _settings(**overrides):
    return load_settings("tiny-sdxl", overrides={"max_train_steps": 6, "checkpointing_steps": 3, **overrides})


def _subject(images, seed: int = 7, prompts=()) -> Subject:
    return Subject("ball-1", tuple(images), PROMPT, CLASS_PROMPT, prompts=tuple(prompts), seed=seed)


def _class_images(base, settings, tmp_path, prompt: str = CLASS_PROMPT) -> list[str]:
    """Class sets are made through `generate`, i.e. by the SDXL pipeline itself."""
    return ClassImageCache(str(tmp_path / "class_images")).ensure(base, prompt, settings).uris


def _stock(path, weights=None, mode="lora"):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)  # the settings' default sampler
    if weights and mode == "lora":
        pipe.load_lora_weights(weights)
    elif weights:
        pipe.unet = UNet2DConditionModel.from_pretrained(weights, subfolder="unet")
        pipe.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(weights, subfolder="text_encoder_2")
    return pipe


def _render(pipe, seeds=(0, 1)) -> np.ndarray:
    """Images as the engine starts them: each from its own seed's [4, 16, 16] noise."""
    latents = torch.stack([torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in seeds])
    out = pipe([PROMPT] * len(seeds), num_inference_steps=10, guidance_scale=7.5, height=32, width=32,
               latents=latents, output_type="np")  # fmt: skip
    return out.images * 255.0


def test_tiny_sdxl_is_deterministic_and_round_trips_through_stock_from_pretrained(sdxl, sdxl_path, tmp_path):
    from transformers import CLIPTextModelWithProjection

    build_tiny_sdxl(tmp_path / "again", seed=0)
    assert fingerprint(tmp_path / "again") == fingerprint(sdxl_path)
    assert sdxl.is_sdxl and isinstance(sdxl.text_encoder_2, CLIPTextModelWithProjection)
    hidden = sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert sdxl.unet.config.cross_attention_dim == hidden and sdxl.unet.config.addition_embed_type == "text_time"
    assert _render(_stock(sdxl_path), seeds=(0,)).shape == (1, 32, 32, 3)
    settings = load_settings("tiny-sdxl")
    assert (settings.preset, settings.resolution) == ("tiny", 32)


def test_training_conditions_the_unet_as_the_stock_pipeline_does(sdxl):
    from engine.diffusion.unet import encode_prompts, make_pipeline, tokenize, unet_added_conditions

    with torch.no_grad():
        ours = encode_prompts(sdxl, tokenize(sdxl, PROMPT))
        pipe = make_pipeline(sdxl, "ddim")
        hidden, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours.hidden, hidden) and torch.equal(ours.pooled, pooled)
    added = unet_added_conditions([ours.expand(3)], [32])
    stock_time_ids = pipe._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), torch.float32, sdxl.text_encoder_2.config.projection_dim
    )  # what the pipeline passes when asked for a 32 px image
    assert torch.equal(added["time_ids"], stock_time_ids.repeat(3, 1)) and added["text_embeds"].shape == (3, 40)


def test_pickled_second_text_encoder_is_refused(sdxl_path, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(sdxl_path, model)
    for weights in (model / "text_encoder_2").glob("*.safetensors"):
        weights.unlink()
    (model / "text_encoder_2" / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "loaded"}))
    with pytest.raises(ModelError, match="text_encoder_2: only pickled weights"):
        resolve_base_model(str(model))


def test_lora_with_class_images_loads_in_stock_sdxl_and_changes_its_output(sdxl, sdxl_path, subject_images, tmp_path):
    settings = _settings(max_train_steps=8)
    class_uris = _class_images(sdxl, settings, tmp_path)
    result = train_subject(sdxl, _subject(subject_images), settings, str(tmp_path / "s"), class_uris)
    before = _render(_stock(sdxl_path))
    after = _render(_stock(sdxl_path, result.weights_uri))
    assert np.abs(after - before).mean() > 0.5


def test_text_encoder_lora_covers_both_encoders_and_renders_like_stock(sdxl, sdxl_path, subject_images, tmp_path):
    """Both text encoders get LoRA; stock loading takes all three components' layers, and stock SDXL renders the
    subject as the engine does (the engine's conditioning is the pipeline's)."""
    settings = _settings(train_text_encoder=True, gradient_checkpointing=True, with_prior_preservation=False,
                         num_images_per_prompt=1)  # fmt: skip
    result = train_subject(sdxl, _subject(subject_images), settings, str(tmp_path / "s"))
    exported = load_file(f"{result.weights_uri}/pytorch_lora_weights.safetensors")
    trained = {k.split(".")[0] for k, v in exported.items() if ".up." in k and v.abs().max() > 0}  # B starts at 0
    assert trained == {k.split(".")[0] for k in exported} == {"unet", "text_encoder", "text_encoder_2"}

    stock = _stock(sdxl_path, result.weights_uri)
    assert set(stock.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    load_subject_weights(sdxl, settings, result.weights_uri)
    try:
        ours = render_subject(sdxl, _subject(subject_images, prompts=[PROMPT]), settings, str(tmp_path / "ours"))
    finally:
        sdxl.reset()
    ours_pixels = np.asarray(Image.open(ours[0]["image"]), dtype=np.float64)
    reference = _render(stock, seeds=(ours[0]["seed"],))[0]
    assert np.abs(np.round(reference) - ours_pixels).max() <= 1
    assert np.abs(_render(_stock(sdxl_path), seeds=(ours[0]["seed"],))[0] - ours_pixels).mean() > 0.5


def test_a_packed_pair_trains_like_each_subject_alone(sdxl, tmp_path):
    """Each prompt through its own subject's slot in both text encoders, each sample through its own UNet slot."""
    jobs = []
    for i, (sid, cls, lr, steps) in enumerate([("a", "ball", 2e-3, 6), ("b", "box", 5e-3, 4)]):
        folder = tmp_path / "images" / sid
        folder.mkdir(parents=True)
        uris = tuple(str(draw_subject(folder / f"{k}.png", shift=i + k)) for k in range(2))
        settings = _settings(learning_rate=lr, max_train_steps=steps, train_text_encoder=True)
        class_uris = _class_images(sdxl, settings, tmp_path, f"a photo of a {cls}")
        captions = tuple(f"a photo of sks {cls}, {k} of 2" for k in range(2)) if sid == "b" else ()  # per photo
        subject = Subject(sid, uris, f"a photo of sks {cls}", f"a photo of a {cls}", seed=100 + i,
                          instance_prompts=captions)  # fmt: skip
        jobs.append(PackJob(subject, settings, str(tmp_path / "packed" / sid), class_uris))
    ended = train_pack(sdxl, jobs, capacity=2)
    assert [e.error for e in ended] == [None, None]
    for job in jobs:
        alone = train_subject(sdxl, job.subject, job.settings, str(tmp_path / "alone" / job.subject.subject_id),
                              job.class_image_uris)  # fmt: skip
        assert_same_training(alone, next(e.result for e in ended if e.subject == job.subject))


def test_killed_and_resumed_training_equals_uninterrupted(sdxl, subject_images, tmp_path):
    settings = _settings(train_text_encoder=True, with_prior_preservation=False)
    straight = train_subject(sdxl, _subject(subject_images), settings, str(tmp_path / "straight"))
    with pytest.raises(Interrupted):
        train_subject(sdxl, _subject(subject_images), settings, str(tmp_path / "resumed"), on_step=stop_at(4))
    resumed = train_subject(sdxl, _subject(subject_images), settings, str(tmp_path / "resumed"))
    assert resumed.resumed_from == 3
    assert resumed.losses == straight.losses
    name = "checkpoints/step-00000006/trainable.safetensors"
    assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_full_fine_tune_exports_stock_folders_and_leaves_the_base_unchanged(sdxl, sdxl_path, subject_images, tmp_path):
    from engine.diffusion.generation import generate

    settings = _settings(mode="full", train_text_encoder=True, with_prior_preservation=False)
    base_images = generate(sdxl, [PROMPT] * 2, [1, 2], settings, batch_size=2)
    result = train_subject(sdxl, _subject(subject_images), settings, str(tmp_path / "s"))
    assert sorted(p.name for p in (tmp_path / "s" / "weights").iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
    before = _render(_stock(sdxl_path))
    after = _render(_stock(sdxl_path, result.weights_uri, mode="full"))
    assert np.abs(after - before).mean() > 0.5

    load_subject_weights(sdxl, settings, result.weights_uri)  # all three folders back in place, as generation does
    loaded = generate(sdxl, [PROMPT] * 2, [1, 2], settings, batch_size=2)
    assert [im.tobytes() for im in loaded] != [im.tobytes() for im in base_images]
    sdxl.reset()
    again = generate(sdxl, [PROMPT] * 2, [1, 2], settings, batch_size=2)
    assert [im.tobytes() for im in again] == [im.tobytes() for im in base_images]
    assert not any(p.requires_grad for name in ("unet", "text_encoder", "text_encoder_2")
                   for p in getattr(sdxl, name).parameters())  # fmt: skip
