"""Curation before training (`curate: true`): the `detect` and `moderate` VLM passes over every instance photo of the
manifest, and `caption` over the photos of subjects with `instance_prompt_mode: caption` (the analyze machinery:
resumable, exactly once), then each photo's verdict (ray_jobs/state/curation.py) into RUN/curation.parquet, each kept
photo's crop into its subject's folder, RUN/subjects/<id>/curated/, and each kept photo's prompt into the subject
handed to training (`Subject.instance_prompts`).

RUN/curation/ holds the passes' inputs (photos.parquet, photos-to-screen.parquet, photos-to-caption.parquet) and
outputs (detect.parquet/, moderation.parquet/, caption.parquet/); a rerun answers only photos not yet answered,
rewrites curation.parquet from them and writes only missing crops.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from engine import storage
from engine.diffusion.subject import Subject
from engine.media.images import read_image
from engine.settings import Settings
from ray_jobs.passes.analyze import AnalyzeRequest, analyze
from ray_jobs.passes.output import PassOutput
from ray_jobs.state.curation import (
    SCHEMA,
    PhotoVerdict,
    class_noun,
    judge_photo,
    photo_id,
    photo_prompt,
    photo_rows,
    square_crop,
    usable_or_reason,
)
from ray_jobs.state.plan import subject_settings
from ray_jobs.state.run_dir import RunDirectory, SubjectStatus, subject_dir
from ray_jobs.state.states import FAILED

FOLDER = "curation"
CROPS = "curated"
# A caption to train with is a phrase, not the caption task's detailed paragraph (a user's caption_prompt wins); the
# text encoder reads 77 tokens (CLIP) or max_sequence_length (T5), so a longer answer would only be cut
CAPTION_PROMPT = ("Describe this photo in one short phrase: the main subject's appearance, its pose and the setting. "
                  "No preamble.")  # fmt: skip
CAPTION_MAX_NEW_TOKENS = 60
PHOTOS_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.string()), ("categories", pa.string()),
                           ("subject_id", pa.string())])  # fmt: skip


@dataclass
class CurationRequest:
    settings: Settings
    vlm_model: str = "tiny"
    address: str | None = None
    verbose: bool = False
    show_progress: bool = True


@dataclass
class Curated:
    subjects: list[Subject]  # to train: kept photos only, cropped where one instance was found
    failed: dict[str, str]  # subjects left with too few usable photos, and why


def _answers(uri: str, columns: list[str]) -> dict[str, dict[str, Any]]:
    """A pass output's rows by id (the columns asked for)."""
    output = PassOutput(uri)
    files = output.data_files()
    if not files:
        return {}
    table = pds.dataset(files, filesystem=output.arrow_filesystem(), format="parquet").to_table(columns=columns)
    return {row["id"]: row for row in table.to_pylist()}


def _crop(source: str, verdict: PhotoVerdict, target: str, settings: Settings) -> None:
    """The photo cropped to a square around its one instance, as a PNG at `target` (written once: a rerun finds it)."""
    if storage.exists(target):
        return
    image = read_image(source, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
    buffer = io.BytesIO()
    image.crop(square_crop(image.width, image.height, verdict.box)).save(buffer, format="PNG")
    storage.write_bytes(target, buffer.getvalue())


def _pass_settings(task: str, settings: Settings) -> Settings:
    """The settings a curation pass runs with: the caption pass asks for a short phrase, unless the user asked
    otherwise."""
    if task != "caption":
        return settings
    return settings.with_overrides({"caption_prompt": settings.caption_prompt or CAPTION_PROMPT,
                                    "vlm_max_new_tokens": min(settings.vlm_max_new_tokens, CAPTION_MAX_NEW_TOKENS)},
                                   source="curation's caption pass")  # fmt: skip


def curate(run: RunDirectory, subjects: list[Subject], request: CurationRequest, metrics=None) -> Curated:
    """Curate every subject's photos: the passes, the verdicts, RUN/curation.parquet, the crops, the prompts."""
    folder = storage.join(run.uri, FOLDER)
    photos = pa.Table.from_pylist(photo_rows(subjects), schema=PHOTOS_SCHEMA)
    own = {s.subject_id: subject_settings(s, request.settings) for s in subjects}
    captioned_ids = {sid for sid, settings in own.items() if settings.instance_prompt_mode == "caption"}
    # Moderation's and caption's inputs leave out `categories` (the noun to find): moderation writes its own column
    # of that name, and a caption is of the whole photo.
    inputs = {"detect": (storage.join(folder, "photos.parquet"), photos),
              "moderate": (storage.join(folder, "photos-to-screen.parquet"), photos.drop_columns(["categories"]))}
    outputs = {"detect": storage.join(folder, "detect.parquet"), "moderate": storage.join(folder, "moderation.parquet")}
    if captioned_ids:
        to_caption = photos.filter(pc.is_in(photos["subject_id"], pa.array(sorted(captioned_ids))))
        inputs["caption"] = (storage.join(folder, "photos-to-caption.parquet"), to_caption.drop_columns(["categories"]))
        outputs["caption"] = storage.join(folder, "caption.parquet")
    for task, out in outputs.items():
        uri, table = inputs[task]
        storage.write_parquet(uri, table)
        # A photo the passes cannot read is an error row there and a refused photo here: the verdicts carry it, so
        # the passes' own exit statuses do not decide the run's.
        analyze(AnalyzeRequest(input=uri, task=task, out=out, settings=_pass_settings(task, request.settings),
                               vlm_model=request.vlm_model, address=request.address, verbose=request.verbose,
                               show_progress=request.show_progress), metrics)  # fmt: skip
    found = _answers(outputs["detect"], ["id", "boxes", "error"])
    screened = _answers(outputs["moderate"], ["id", "safe", "score", "categories", "error"])
    captions = _answers(outputs["caption"], ["id", "caption", "error"]) if captioned_ids else {}
    rows, kept_subjects, failed = [], [], {}
    for subject in subjects:
        noun, ids = class_noun(subject), [photo_id(subject.subject_id, k) for k in range(len(subject.instance_images))]
        verdicts = [judge_photo(subject.subject_id, uri, noun, found.get(i), screened.get(i), own[subject.subject_id],
                                captions.get(i)) for i, uri in zip(ids, subject.instance_images)]  # fmt: skip
        rows += [v.row() for v in verdicts]
        reason = usable_or_reason(subject, verdicts, own[subject.subject_id])
        if reason is not None:
            failed[subject.subject_id] = reason
            continue
        images, prompts = [], []
        for k, (uri, verdict) in enumerate(zip(subject.instance_images, verdicts)):
            if not verdict.kept:
                continue
            if verdict.box is not None:
                target = storage.join(subject_dir(run.uri, subject.subject_id), CROPS, f"{k}.png")
                _crop(uri, verdict, target, own[subject.subject_id])
                uri = target
            images.append(uri)
            prompts.append(photo_prompt(subject.instance_prompt, verdict.caption))
        captioned = subject.subject_id in captioned_ids
        kept_subjects.append(replace(subject, instance_images=tuple(images),
                                     instance_prompts=tuple(prompts) if captioned else ()))  # fmt: skip
    storage.write_parquet(run.curation, pa.Table.from_pylist(rows, schema=SCHEMA))
    return Curated(kept_subjects, failed)


def curate_subjects(run: RunDirectory, subjects: list[Subject], request: CurationRequest,
                    metrics=None) -> list[Subject]:  # fmt: skip
    """Curate, then record: a subject left with too few usable photos fails alone (its status says why), unless it
    is trained already (its photos no longer matter). Returns the subjects to plan, on their kept photos."""
    curated = curate(run, subjects, request, metrics)
    planned = list(curated.subjects)
    for subject in subjects:
        if subject.subject_id not in curated.failed:
            continue
        status = run.read_status(subject.subject_id) or SubjectStatus(subject.subject_id)
        if status.is_trained:
            planned.append(subject)
        else:
            status.state, status.error = FAILED, curated.failed[subject.subject_id]
            run.write_status(status)
    if curated.failed:
        print(f"curation: {len(curated.failed)} subject(s) left with too few usable photos: "
              f"{', '.join(sorted(curated.failed))}")  # fmt: skip
    return planned
