"""Curation's decisions without Ray: the class noun, each photo's verdict, the square crop, too few photos, the
photos none or several were found in refused by `curate_unlocated`, and each photo's prompt in caption mode."""

from __future__ import annotations

import pytest

from engine.diffusion.subject import Subject
from engine.settings import load_settings
from ray_jobs.state.curation import (
    class_noun,
    judge_photo,
    photo_prompt,
    photo_rows,
    plural,
    square_crop,
    usable_or_reason,
)

SAFE = {"safe": True, "score": 0.1, "categories": [], "error": None}


def _subject(class_prompt="a photo of a dog", images=("a.png", "b.png")):
    return Subject("s0", images, "a photo of sks dog", class_prompt)


def test_the_noun_is_the_class_prompts_last_word_and_each_photo_is_a_row():
    assert class_noun(_subject("a photo of a Dog.")) == "dog"
    assert class_noun(_subject(None)) == "dog"  # no class prompt: the instance prompt's
    assert photo_rows([_subject()]) == [
        {"id": "s0/0", "image": "a.png", "categories": "dog", "subject_id": "s0"},
        {"id": "s0/1", "image": "b.png", "categories": "dog", "subject_id": "s0"},
    ]


def test_one_instance_is_cropped_none_or_several_kept_whole_flagged_or_unreadable_refused():
    settings = load_settings("tiny")
    box = {"label": "dog", "x1": 10.0, "y1": 20.0, "x2": 30.0, "y2": 60.0}
    one = judge_photo("s0", "a.png", "dog", {"boxes": [box], "error": None}, SAFE, settings)
    assert one.kept and one.box == {"x1": 10.0, "y1": 20.0, "x2": 30.0, "y2": 60.0} and "cropped" in one.reason
    two = judge_photo("s0", "a.png", "dog", {"boxes": [box, box], "error": None}, SAFE, settings)
    assert two.kept and two.box is None and two.reason == "2 dogs found: kept whole"
    none = judge_photo("s0", "a.png", "dog", {"boxes": [], "error": None}, SAFE, settings)
    assert none.kept and none.reason == "no dog found: kept whole"
    speck = {"label": "dog", "x1": 10.0, "y1": 20.0, "x2": 12.0, "y2": 23.0}  # a crop around it could not train
    small = judge_photo("s0", "a.png", "dog", {"boxes": [speck], "error": None}, SAFE, settings)
    assert small.kept and small.box is None and "under min_image_side" in small.reason and "kept whole" in small.reason
    flagged = {"safe": False, "score": 0.9, "categories": ["S1"], "error": None}
    refused = judge_photo("s0", "a.png", "dog", {"boxes": [box], "error": None}, flagged, settings)
    assert not refused.kept and refused.categories == ("S1",) and "flagged by moderation (S1" in refused.reason
    # moderation_threshold decides from the score, as for generated images
    strict = settings.with_overrides({"moderation_threshold": 0.05}, source="t")
    assert not judge_photo("s0", "a.png", "dog", {"boxes": [], "error": None}, SAFE, strict).kept
    broken = judge_photo("s0", "a.png", "dog", {"boxes": None, "error": "a.png: no such file"}, SAFE, settings)
    assert not broken.kept and broken.reason == "unusable: a.png: no such file"
    assert not judge_photo("s0", "a.png", "dog", None, SAFE, settings).kept


@pytest.mark.parametrize(
    ("size", "box", "crop"),
    [
        ((100, 100), {"x1": 40, "y1": 40, "x2": 60, "y2": 60}, (37, 37, 63, 63)),  # 20 px + 15 % each side
        ((100, 100), {"x1": 0, "y1": 0, "x2": 20, "y2": 10}, (0, 0, 26, 26)),  # moved inside, not shrunk
        ((100, 50), {"x1": 10, "y1": 0, "x2": 90, "y2": 50}, (25, 0, 75, 50)),  # at most the shorter side
    ],
)
def test_the_crop_is_a_square_around_the_box_inside_the_photo(size, box, crop):
    left, top, right, bottom = square_crop(*size, box)
    assert (left, top, right, bottom) == crop and right - left == bottom - top


def test_too_few_usable_photos_names_every_refused_one():
    settings = load_settings("tiny", overrides={"min_instance_images": 2})
    subject = _subject()
    kept = judge_photo("s0", "a.png", "dog", {"boxes": [], "error": None}, SAFE, settings)
    gone = judge_photo("s0", "b.png", "dog", {"boxes": None, "error": "b.png: no such file"}, SAFE, settings)
    reason = usable_or_reason(subject, [kept, gone], settings)
    assert reason.startswith("curation left 1 usable photo(s) of 2, fewer than min_instance_images (2)")
    assert "b.png: unusable: b.png: no such file" in reason and "a.png" not in reason
    assert usable_or_reason(subject, [kept, gone], load_settings("tiny")) is None


def test_unlocated_photos_are_refused_by_setting_and_count_against_the_minimum():
    settings = load_settings("tiny", overrides={"curate_unlocated": "refuse", "min_instance_images": 2})
    box = {"label": "box", "x1": 10.0, "y1": 20.0, "x2": 30.0, "y2": 60.0}
    none = judge_photo("s0", "a.png", "box", {"boxes": [], "error": None}, SAFE, settings)
    assert not none.kept and none.reason == "no box found: refused (curate_unlocated: refuse)"
    three = judge_photo("s0", "b.png", "box", {"boxes": [box] * 3, "error": None}, SAFE, settings)
    assert not three.kept and three.reason == "3 boxes found: refused (curate_unlocated: refuse)"
    one = judge_photo("s0", "c.png", "box", {"boxes": [box], "error": None}, SAFE, settings)
    assert one.kept and one.box is not None  # one instance: cropped as ever
    reason = usable_or_reason(_subject(images=("a.png", "b.png", "c.png")), [none, three, one], settings)
    assert reason.startswith("curation left 1 usable photo(s) of 3, fewer than min_instance_images (2)")
    assert "a.png: no box found: refused" in reason and "b.png: 3 boxes found: refused" in reason
    assert [plural(n) for n in ("ball", "box", "dress", "puppy", "toy")] == ["balls", "boxes", "dresses", "puppies",
                                                                               "toys"]  # fmt: skip


def test_caption_mode_records_each_photos_caption_and_prompt():
    settings = load_settings("tiny", overrides={"curate": True, "instance_prompt_mode": "caption"})
    found = {"boxes": [], "error": None}
    captioned = {"caption": " a brown dog\n on grass ", "error": None}
    verdict = judge_photo("s0", "a.png", "dog", found, SAFE, settings, captioned)
    assert verdict.kept and verdict.caption == "a brown dog on grass"
    assert photo_prompt("a photo of sks dog", verdict.caption) == "a photo of sks dog, a brown dog on grass"
    assert photo_prompt("a photo of sks dog", "") == "a photo of sks dog"  # nothing said: the instance prompt alone
    assert not judge_photo("s0", "a.png", "dog", found, SAFE, settings, None).kept  # never captioned
    failed = judge_photo("s0", "a.png", "dog", found, SAFE, settings, {"caption": None, "error": "a.png: too small"})
    assert not failed.kept and failed.reason == "unusable: a.png: too small"
    # fixed mode neither needs nor records a caption
    assert judge_photo("s0", "a.png", "dog", found, SAFE, load_settings("tiny")).caption is None
