"""The evaluation models (tiny, built offline and loaded as hub models are) and the paper's three scores."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from engine.evaluation import Embeddings, Evaluator, diversity, resolve_eval_model
from engine.hub import ModelError


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    return Evaluator("tiny", "tiny", "cpu")


def _picture(colour, background=(30, 60, 200), size=(96, 80)) -> Image.Image:
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).ellipse((10, 8, 60, 58), fill=colour)
    return image


def test_an_image_matches_itself_best_and_each_score_is_a_cosine(evaluator):
    ball, moved, other = _picture((240, 200, 20)), _picture((240, 200, 20), size=(120, 80)), Image.new("RGB", (64, 64))
    references = evaluator.image_embeddings([ball])
    scores = evaluator.score([ball, moved, other], ["a photo of sks ball"] * 3, [references] * 3)
    assert scores[0].dino == pytest.approx(1.0, abs=1e-5) and scores[0].clip_i == pytest.approx(1.0, abs=1e-5)
    assert scores[0].dino > scores[1].dino > scores[2].dino  # the same ball resized, then a black square
    assert scores[0].clip_i > scores[2].clip_i
    assert all(-1 <= getattr(s, k) <= 1 for s in scores for k in ("dino", "clip_i", "clip_t"))


def test_clip_t_is_the_stock_clip_similarity_of_prompt_and_image(evaluator):
    """CLIP-T as transformers' CLIPModel computes it: its logits are the cosine times the learned scale."""
    ball = _picture((240, 200, 20))
    prompts = ["a photo of sks ball", "a watercolour of a house at night"]
    inputs = evaluator.clip_processor(text=prompts, images=[ball], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = evaluator.clip(**inputs).logits_per_image[0] / evaluator.clip.logit_scale.exp()
    references = evaluator.image_embeddings([ball])
    scores = evaluator.score([ball, ball], prompts, [references] * 2)
    assert [s.clip_t for s in scores] == pytest.approx(logits.tolist(), abs=1e-5)
    assert scores[0].clip_t != scores[1].clip_t


def test_the_dino_score_averages_over_every_photo_of_the_subject(evaluator):
    photos = [_picture((240, 200, 20)), _picture((20, 200, 240))]
    references = evaluator.image_embeddings(photos)
    (score,) = evaluator.score([photos[0]], ["x"], [references])
    assert score.dino == pytest.approx((1 + float(references.dino[0] @ references.dino[1])) / 2, abs=1e-5)


def test_diversity_is_zero_for_copies_and_grows_with_difference():
    same = torch.nn.functional.normalize(torch.ones(3, 4), dim=-1)
    assert diversity(same) == pytest.approx(0.0, abs=1e-6)
    assert diversity(torch.eye(4)) == pytest.approx(1.0)
    assert diversity(same[:1]) == 0.0
    assert isinstance(Embeddings(same, same).dino, torch.Tensor)


def test_pickled_or_missing_evaluation_models_are_refused(tmp_path):
    folder = tmp_path / "dino"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(ModelError, match="only pickles: pytorch_model.bin"):
        resolve_eval_model(str(folder), "dino")
    with pytest.raises(ModelError, match="no such directory"):
        resolve_eval_model(str(tmp_path / "absent"), "clip")
