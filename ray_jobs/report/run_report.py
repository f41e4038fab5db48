"""The report of a run directory: a card per subject (instance images, loss curve, generated images with their
moderation verdicts and evaluation scores, attempt history), the worst-scored subjects first, split into pages."""

from __future__ import annotations

import datetime
import functools
import json
import math
import statistics
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from engine import storage
from engine.media.images import DEFAULT_MAX_IMAGE_PIXELS
from ray_jobs.report.attempts import AttemptSummary, attempt_summary
from ray_jobs.report.pages import (
    READ_THREADS,
    ReportError,
    ReportLayout,
    canonical_uri,
    open_table,
    printable,
    report_path_for,
    write_page,
)
from ray_jobs.report.table_report import Box, BoxOverlay
from ray_jobs.report.thumbnails import Picture, ThumbnailStore
from ray_jobs.state.generations import RUN_SCHEMA
from ray_jobs.state.manifest import subjects_of_run
from ray_jobs.state.run_dir import RunDirectory, SubjectStatus, summarize
from ray_jobs.state.states import FAILED

SUBJECTS_PER_PAGE = 200  # a page of a 1,000-subject run still opens at once; images load lazily
LOSS_WIDTH, LOSS_HEIGHT, LOSS_MAX_POINTS = 320, 96, 400
# A subject's mean under these is flagged whatever the rest of the run scored: every method in the DreamBooth paper's
# Table 1 scores above them (textual inversion, the lowest, has DINO 0.569 and CLIP-T 0.255). They hold for the
# paper's models only (other models, the tiny random ones above all, score on other scales): (metric, model) → floor.
FLOORS = {("dino", "facebook/dino-vits16"): 0.5, ("clip_t", "openai/clip-vit-large-patch14"): 0.2}
QUARTILE_MIN_SUBJECTS = 4  # fewer evaluated subjects have no meaningful bottom quarter
WORST_LISTED = SUBJECTS_PER_PAGE  # rows of page 1's worst-first table; every card carries its own flag


@dataclass(frozen=True)
class Verdict:
    """A generated image's moderation result (a row of RUN/moderation.parquet)."""

    safe: bool | None
    categories: list[str]
    score: float | None
    error: str | None

    @property
    def css(self) -> str:
        return "error" if self.error else "safe" if self.safe else "flagged"


def _score(value: Any) -> float | None:
    """A score as read from a file: a finite number, else None (shown as a dash, never as the file's text)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class EvaluationRow:
    """A generated image's evaluation as the report reads it from its row of RUN/evaluation.parquet (with the floors
    of the models that scored it); scores are None when the row failed."""

    dino: float | None
    clip_i: float | None
    clip_t: float | None
    error: str | None
    class_prompt: bool  # generated from the subject's class prompt: its DINO is a PRES sample (lower is better)
    dino_floor: float | None = None  # FLOORS of the models that scored it
    clip_t_floor: float | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> EvaluationRow:
        dino, clip_i, clip_t = (_score(row.get(k)) for k in ("dino", "clip_i", "clip_t"))
        return cls(dino, clip_i, clip_t, printable(row.get("error")), row.get("class_prompt") is True,
                   FLOORS.get(("dino", row.get("dino_model"))), FLOORS.get(("clip_t", row.get("clip_model"))))

    @property
    def low(self) -> set[str]:
        """The scores under their floors (a class-prompt image's DINO is not: there, low is good)."""
        def under(value: float | None, floor: float | None) -> bool:
            return value is not None and floor is not None and value < floor

        low = {"dino"} if under(self.dino, self.dino_floor) and not self.class_prompt else set()
        return low | ({"clip_t"} if under(self.clip_t, self.clip_t_floor) else set())


@dataclass(frozen=True)
class SubjectScores:
    """A subject's evaluation means, from its status.json's `evaluation` (over its images not from the class
    prompt; `pres` is the mean DINO of those that are)."""

    images: int  # scored, class-prompt ones included
    errors: int  # not scored
    dino: float | None
    clip_i: float | None
    clip_t: float | None
    pres: float | None
    class_images: int
    dino_model: str | None
    clip_model: str | None
    evaluated_at: str | None

    @classmethod
    def of(cls, value: Any) -> SubjectScores | None:
        if not isinstance(value, dict):
            return None
        count = {k: value.get(k) if isinstance(value.get(k), int) else 0 for k in ("images", "errors", "class_images")}
        text = {k: printable(str(value[k])) if value.get(k) is not None else None
                for k in ("dino_model", "clip_model", "evaluated_at")}  # fmt: skip
        return cls(**count, **text, **{k: _score(value.get(k)) for k in ("dino", "clip_i", "clip_t", "pres")})


@dataclass(frozen=True)
class ScoreBar:
    """Where a subject's mean of one metric is flagged: under an absolute floor, or under the run's first quartile
    (from QUARTILE_MIN_SUBJECTS evaluated subjects up; the lowest quarter of the run, whatever its level)."""

    metric: str  # the SubjectScores field
    label: str
    floor: float | None  # None unless every subject was scored by the model FLOORS has a floor for
    quartile: float | None
    subjects: int  # evaluated subjects with this mean

    @classmethod
    def of_run(cls, metric: str, label: str, scores: list[SubjectScores]) -> ScoreBar:
        values = sorted(v for v in (getattr(s, metric) for s in scores) if v is not None)
        enough = len(values) >= QUARTILE_MIN_SUBJECTS
        models = {s.dino_model if metric == "dino" else s.clip_model for s in scores}
        floor = FLOORS.get((metric, models.pop())) if len(models) == 1 else None
        return cls(metric, label, floor, statistics.quantiles(values, n=4, method="inclusive")[0] if enough else None,
                   len(values))  # fmt: skip

    def reasons(self, scores: SubjectScores) -> list[str]:
        value = getattr(scores, self.metric)
        if value is None:
            return []
        reasons = [f"{self.label} {value:.3f} under {self.floor:.2f}"] if self.floor is not None and value < self.floor else []
        if self.quartile is not None and value < self.quartile:
            reasons.append(f"{self.label} {value:.3f} in the run's lowest quarter (under {self.quartile:.3f})")
        return reasons


def score_flags(scores: SubjectScores, bars: list[ScoreBar]) -> list[str]:
    """Why a subject's scores flag it (nothing when they do not): a low mean, or not one image scored."""
    if not scores.images and scores.errors:
        return ["no image could be scored"]
    return [reason for bar in bars for reason in bar.reasons(scores)]


@dataclass
class GeneratedImage:
    id: str | None
    seed: int | None
    picture: Picture
    verdict: Verdict | None  # None: not moderated
    scores: EvaluationRow | None = None  # None: not evaluated
    withheld: bool = False  # shown only when the report is asked to show withheld images


@dataclass
class PromptGroup:
    prompt_index: int
    prompt: str
    images: list[GeneratedImage] = field(default_factory=list)

    @property
    def class_prompt(self) -> bool:
        return any(i.scores is not None and i.scores.class_prompt for i in self.images)


@dataclass(frozen=True)
class LossCurve:
    """A train log's loss as an SVG polyline in a LOSS_WIDTH x LOSS_HEIGHT box (higher loss drawn higher)."""

    points: str
    first_step: int
    last_step: int
    low: float
    high: float
    final: float
    width: int = LOSS_WIDTH
    height: int = LOSS_HEIGHT


@dataclass(frozen=True)
class PhotoCuration:
    """An instance photo's row of RUN/curation.parquet: kept or refused, why, the box it was cropped around, and the
    caption it trained with (caption mode)."""

    kept: bool
    reason: str
    box: Box | None
    caption: str | None = None

    def overlay(self, picture: Picture) -> BoxOverlay | None:
        if self.box is None or not self.box.drawable or picture.size is None:
            return None
        return BoxOverlay(*picture.size, [self.box])


def _curation(run_uri: str, notes: list[str]) -> dict[tuple[str, str], PhotoCuration]:
    """RUN/curation.parquet by (subject, photo URI); empty when the run was not curated."""
    rows = _read_optional_table(RunDirectory(run_uri).curation,
                                ["subject_id", "image", "kept", "reason", "box", "caption"], notes)  # fmt: skip
    return {(r["subject_id"], r["image"]): PhotoCuration(bool(r["kept"]), r["reason"] or "",
                                                         Box.of({**r["box"], "label": "crop"}) if r["box"] else None,
                                                         r.get("caption"))
            for r in rows}  # fmt: skip


@dataclass
class SubjectCard:
    status: SubjectStatus
    page: int
    instance_images: list[Picture]
    prompts: list[PromptGroup]
    loss: LossCurve | None
    scores: SubjectScores | None = None  # None: not evaluated
    flags: list[str] = field(default_factory=list)  # why its scores put it among the worst
    curation: list[PhotoCuration | None] = field(default_factory=list)  # per instance image, when curated

    @property
    def instance_photos(self) -> list[tuple[Picture, PhotoCuration | None]]:
        return list(zip(self.instance_images, self.curation or [None] * len(self.instance_images)))

    @functools.cached_property
    def attempts(self) -> AttemptSummary:
        return attempt_summary(self.status)


def loss_curve(records: list[dict[str, Any]]) -> LossCurve | None:
    """The curve of a train log's finite losses, thinned to at most LOSS_MAX_POINTS points; None if nothing to draw."""
    steps = [(int(r["step"]), float(r["loss"])) for r in records if "loss" in r and math.isfinite(float(r["loss"]))]
    if not steps:
        return None
    stride = math.ceil(len(steps) / LOSS_MAX_POINTS)
    shown = steps[::stride] if steps[-1] in steps[::stride] else [*steps[::stride], steps[-1]]
    first, last = steps[0][0], steps[-1][0]
    low, high = min(loss for _, loss in steps), max(loss for _, loss in steps)
    pad = 4

    def xy(step: int, loss: float) -> str:
        x = pad + (LOSS_WIDTH - 2 * pad) * ((step - first) / (last - first) if last > first else 0.5)
        y = pad + (LOSS_HEIGHT - 2 * pad) * ((high - loss) / (high - low) if high > low else 0.5)
        return f"{x:.1f},{y:.1f}"

    return LossCurve(" ".join(xy(s, loss) for s, loss in shown), first, last, low, high, steps[-1][1])


def _read_loss_curve(run_uri: str, subject_id: str) -> LossCurve | None:
    uri = RunDirectory(run_uri).train_log(subject_id)
    try:
        text = storage.read_bytes(uri).decode()
    except FileNotFoundError:
        return None
    try:
        return loss_curve([json.loads(line) for line in text.splitlines() if line.strip()])
    except (ValueError, KeyError, TypeError):  # a log from another version: no curve rather than no report
        return None


def _instance_images(record: dict[str, Any], notes: list[str]) -> dict[str, tuple[str, ...]]:
    """Each subject's instance image URIs, from the manifest(s) the run was started with, as far as still readable."""
    subjects, problems = subjects_of_run(record)
    notes.extend(problems)
    return {sid: s.instance_images for sid, s in subjects.items()}


def _read_optional_table(uri: str, wanted: list[str], notes: list[str]) -> list[dict[str, Any]]:
    """The `wanted` columns (those present) of a run's table (a file or a folder of part files), as rows; none when
    it is absent or unreadable."""
    if not storage.exists(uri):
        return []
    try:
        table = open_table(uri)
        return table.to_table(columns=[c for c in wanted if c in table.schema.names]).to_pylist()
    except (ReportError, pa.ArrowException, OSError) as err:
        notes.append(f"{uri}: unreadable, left out ({type(err).__name__}: {err})")
        return []


def _verdicts(run_uri: str, notes: list[str]) -> dict[str, Verdict]:
    rows = _read_optional_table(
        RunDirectory(run_uri).moderation, ["id", "safe", "categories", "score", "error"], notes
    )
    return {
        r["id"]: Verdict(r.get("safe"), list(r.get("categories") or []), r.get("score"), r.get("error"))
        for r in rows
        if r.get("id") is not None
    }


def _evaluation_rows(run_uri: str, notes: list[str]) -> dict[str, EvaluationRow]:
    rows = _read_optional_table(
        RunDirectory(run_uri).evaluation,
        ["id", "dino", "clip_i", "clip_t", "error", "class_prompt", "dino_model", "clip_model"],
        notes,
    )
    return {r["id"]: EvaluationRow.of(r) for r in rows if r.get("id") is not None}


def _prompt_groups(
    rows: list[dict[str, Any]], verdicts: dict[str, Verdict], scores: dict[str, EvaluationRow], thumbs: ThumbnailStore
) -> list[PromptGroup]:
    groups: dict[tuple[int, str], PromptGroup] = {}
    for row in sorted(rows, key=lambda r: (r.get("prompt_index") or 0, r.get("image_index") or 0)):
        key = (row.get("prompt_index") or 0, row.get("prompt") or "")
        group = groups.setdefault(key, PromptGroup(*key))
        row_id = row.get("id")
        picture = thumbs.for_uri(row["image"])
        group.images.append(GeneratedImage(row_id, row.get("seed"), picture, verdicts.get(row_id), scores.get(row_id),
                                           bool(row.get("withheld"))))  # fmt: skip
    return list(groups.values())


def _flag_low_scores(cards: list[SubjectCard]) -> list[ScoreBar]:
    """Flag each evaluated card whose DINO or CLIP-T is low (ScoreBar); the bars, for the page to state."""
    evaluated = [c.scores for c in cards if c.scores is not None]
    bars = [ScoreBar.of_run("dino", "DINO", evaluated), ScoreBar.of_run("clip_t", "CLIP-T", evaluated)]
    for card in cards:
        card.flags = score_flags(card.scores, bars) if card.scores is not None else []
    return bars


def worst_first(cards: list[SubjectCard]) -> list[SubjectCard]:
    """The evaluated cards, flagged ones first, each part by DINO lowest first (those without a DINO first of all)."""
    evaluated = [c for c in cards if c.scores is not None]
    return sorted(evaluated, key=lambda c: (not c.flags, c.scores.dino is not None, c.scores.dino or 0.0))


def _wall_time(record: dict[str, Any]) -> str | None:
    if not (record.get("started_at") and record.get("ended_at")):
        return None
    try:
        started, ended = (datetime.datetime.fromisoformat(record[k]) for k in ("started_at", "ended_at"))
    except ValueError:
        return None
    return str(datetime.timedelta(seconds=round((ended - started).total_seconds())))


def write_run_report(run_uri: str, out: str | None = None, show_withheld: bool = False) -> str:
    """Write the report of the run directory `run_uri` (default RUN/report.html, more pages beside it); its URI.
    Images withheld as unsafe are counted but left out of the galleries unless `show_withheld`."""
    run = RunDirectory(run_uri)
    record = run.require_run()
    layout = ReportLayout(canonical_uri(out or report_path_for(run.uri)))
    notes: list[str] = []
    statuses = sorted(run.read_statuses().values(), key=lambda s: s.subject_id)
    instance = _instance_images(record, notes)
    verdicts = _verdicts(run.uri, notes)
    evaluation_rows = _evaluation_rows(run.uri, notes)
    generations = defaultdict(list)
    withheld = 0
    for row in _read_optional_table(run.generations, RUN_SCHEMA.names, notes):  # the manifest's extras left out
        withheld += bool(row.get("withheld"))
        if show_withheld or not row.get("withheld"):
            generations[row["subject_id"]].append(row)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        curves = list(pool.map(lambda s: _read_loss_curve(run.uri, s.subject_id), statuses))
    thumbs = ThumbnailStore(layout, record["settings"].get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
    curation = _curation(run.uri, notes)
    cards = [
        SubjectCard(
            status=status,
            page=1 + index // SUBJECTS_PER_PAGE,
            instance_images=[thumbs.for_uri(uri, sized=bool(curation)) for uri in instance.get(status.subject_id, ())],
            curation=[curation.get((status.subject_id, uri)) for uri in instance.get(status.subject_id, ())],
            prompts=_prompt_groups(generations.get(status.subject_id, []), verdicts, evaluation_rows, thumbs),
            loss=curve,
            scores=SubjectScores.of(status.evaluation),
        )
        for index, (status, curve) in enumerate(zip(statuses, curves))
    ]
    thumbs.make_pending()
    _write_run_pages(layout, run, record, cards, notes, {"withheld": withheld, "withheld_shown": show_withheld})
    return out or report_path_for(run.uri)


def _write_run_pages(
    layout: ReportLayout,
    run: RunDirectory,
    record: dict[str, Any],
    cards: list[SubjectCard],
    notes: list[str],
    withholding: dict[str, Any],
) -> None:
    pages = max(1, math.ceil(len(cards) / SUBJECTS_PER_PAGE))
    bars = _flag_low_scores(cards)
    ranked = worst_first(cards)
    statuses = {c.status.subject_id: c.status for c in cards}
    images = [i for c in cards for g in c.prompts for i in g.images]
    summary = {
        "counts": summarize(statuses),
        "subjects": len(cards),
        "images": len(images),
        "moderated": sum(i.verdict is not None for i in images),
        "flagged": sum(i.verdict is not None and i.verdict.css == "flagged" for i in images),
        "moderation_errors": sum(i.verdict is not None and i.verdict.css == "error" for i in images),
        "evaluated": len(ranked),
        "low_scores": sum(bool(c.flags) for c in ranked),
        **withholding,
    }
    context = {
        "run_uri": run.uri,
        "record": record,
        "wall_time": _wall_time(record),
        "summary": summary,
        "failed": [c for c in cards if c.status.state == FAILED],
        "rejected": run.read_rejected_rows(),
        "notes": notes,
        "bars": bars,
        "quartile_min": QUARTILE_MIN_SUBJECTS,
        "worst": ranked[:WORST_LISTED],
        "eval_models": sorted({(c.scores.dino_model, c.scores.clip_model) for c in ranked}, key=str),
        "pages": [layout.page_name(n) for n in range(1, pages + 1)],
        # where each subject's card is, for the pack mates named in the history tables
        "card_links": {c.status.subject_id: f"{layout.page_name(c.page)}#subject-{c.status.subject_id}" for c in cards},
    }
    for number in range(1, pages + 1):
        page_cards = cards[(number - 1) * SUBJECTS_PER_PAGE : number * SUBJECTS_PER_PAGE]
        write_page(storage.join(layout.folder, layout.page_name(number)), "run_report.html",
                    page=number, first=(number - 1) * SUBJECTS_PER_PAGE + 1, cards=page_cards, **context)  # fmt: skip
    _remove_stale_pages(layout, pages)


def _remove_stale_pages(layout: ReportLayout, pages: int) -> None:
    """Pages past the last one, left by an earlier report of more subjects, would link to nothing; remove them."""
    for name in storage.listdir(layout.folder):
        number = name.removeprefix(f"{layout.stem}-").removesuffix(".html")
        if name == f"{layout.stem}-{number}.html" and number.isdigit() and int(number) > pages:
            storage.remove(storage.join(layout.folder, name))

