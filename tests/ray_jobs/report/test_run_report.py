"""The run report (ray_jobs/report/run_report.py): cards, history, pages, notes and evaluation scores, read as a user
reads them (Chromium for what only a browser shows)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image, ImageStat

from engine import storage
from engine.settings import load_settings
from ray_jobs.report import run_report
from ray_jobs.state.generations import SCHEMA as GENERATIONS_SCHEMA
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory, SubjectStatus
from tests.helpers.report_inputs import PACK, SCRIPT, build_run, png, write_parquet
from tests.helpers.report_pages import Elements, dump_dom, run_chromium, text

# -- the run report --------------------------------------------------------------------------------------------------


def test_the_run_report_renders_to_a_non_blank_page(small_run, chromium, tmp_path):
    shot = tmp_path / "report.png"
    run_chromium(chromium, tmp_path, small_run["report"].as_uri(), f"--screenshot={shot}", "--window-size=1200,2000")
    image = Image.open(shot).convert("RGB")
    assert len(image.getcolors(maxcolors=1_000_000) or range(1_000_001)) > 1
    assert max(ImageStat.Stat(image.convert("L")).stddev) > 10


def test_the_dom_has_a_card_per_subject_and_an_image_per_generated_row(small_run, chromium, tmp_path):
    dom = dump_dom(chromium, tmp_path, small_run["report"])
    elements = Elements(dom)
    cards = elements.with_class("subject-card")
    assert [c["id"] for c in cards] == ["subject-alpha", "subject-beta", "subject-gamma"]
    generated = elements.with_class("generated")
    assert len(generated) == len(small_run["generations"]) == 5
    assert all(img["loading"] == "lazy" for img in elements.named("img"))
    # The prompt with a script is shown as text: escaped in the DOM, no script element, nothing injected ran.
    assert "a photo of sks ball &lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert elements.named("script") == []
    assert "<title>dreamfleet run" in dom
    assert elements.with_class("note") == []  # nothing in this run is missing or changed
    # The flagged image is marked with its categories and score, the moderation error with its message.
    assert "flagged: S1, S10 · score 0.91" in dom
    assert "moderation error: image decode failed" in dom


def test_the_failed_subject_and_the_rejected_rows_say_why(small_run):
    html = small_run["report"].read_text()
    escaped = "&lt;b&gt;CUDA&lt;/b&gt; out of memory after 3 attempts"
    assert html.count(escaped) >= 2  # in the failures table and on gamma's card
    assert "<b>CUDA</b>" not in html
    assert 'href="report.html#subject-gamma"' in html
    assert "manifest row 3 (bad id)" in html and "invalid subject_id &#39;bad id&#39;" in html
    assert html.count('<svg class="loss"') == 2  # alpha's and beta's training loss; gamma has no log


def card(html: str, subject_id: str) -> str:
    """A subject's card, as the page's HTML."""
    start = html.index(f'id="subject-{subject_id}"')
    return html[start : html.index("</article>", start)]


def headline(html: str, subject_id: str) -> str:
    found = card(html, subject_id)
    return text(found[found.index("<h3>") : found.index("</h3>")])


def history(html: str, subject_id: str) -> list[str]:
    """The rows of a subject's history table, as text."""
    return [text(row.split("</tr>")[0]) for row in card(html, subject_id).split('<tr class="attempt">')[1:]]


def test_a_card_counts_retries_per_stage_not_each_stage_as_an_attempt(small_run):
    html = small_run["report"].read_text()
    # alpha trained and rendered first time: status.attempts is 2, one per stage, and neither is a retry.
    assert headline(html, "alpha") == "alpha done"
    # beta's training was tried again after its worker died, and again after the driver was killed mid-attempt.
    assert headline(html, "beta") == "beta done · 2 retries"
    assert headline(html, "gamma") == "gamma failed · 2 retries"
    assert "Failed after 3 training attempts:" in text(card(html, "gamma"))
    assert "attempts" not in headline(html, "alpha") + headline(html, "beta")
    failures = html[html.index('<section id="failures">') : html.index("</section>")]
    assert "gamma 3 training attempts" in text(failures)


def test_the_history_shows_each_training_attempts_pack_and_pack_mates(small_run):
    html = small_run["report"].read_text()
    assert history(html, "alpha") == ["1 train ok 20 steps · 3.5 s · packed with beta",
                                      "2 generate ok 2 images · 1.0 s"]  # fmt: skip
    assert history(html, "beta") == [
        "1 train failed worker process died: ActorDiedError packed with alpha",
        "2 train interrupted no outcome recorded",  # counted in status.json, its outcome never written
        "3 train ok 10 steps (resumed from step 10) · 2.0 s · alone",
        "4 generate ok 1 image · 1.0 s",
    ]
    # A mate is a link to its card; the pack's id is there on hover.
    assert '<span class="pack" title="pack node1-42-1">packed with <a href="report.html#subject-beta">beta</a>' in html


def test_retries_failures_and_packs_are_counted_from_the_history_of_any_run(tmp_path):
    run = RunDirectory(str(tmp_path / "packed"))
    run.start(command="run", manifest_uri=str(tmp_path / "gone.parquet"), manifest_fingerprint="0",
              settings=load_settings("tiny"), base_model="tiny", base_model_path="/x", extend=False)  # fmt: skip
    mates = [f"m{i:02d}" for i in range(9)]
    train = {"stage": "train", "ok": True, "steps_run": 20, "pack": PACK}
    fail = {"stage": "generate", "ok": False, "error": "out of disk"}
    run.write_status(SubjectStatus("big-pack", "done", 2, history=[
        {"attempt": 1, **train, "pack_mates": mates}, {"attempt": 2, "stage": "generate", "ok": True}]))  # fmt: skip
    # Trained after one retry, then every generation attempt failed: retries 1 + 2, failed after 3 of its last stage.
    run.write_status(SubjectStatus("render-fails", "failed", 5, "out of disk", history=[
        {"attempt": 1, "stage": "train", "ok": False, "error": "NaN loss"}, {"attempt": 2, **train, "pack_mates": []},
        *({"attempt": a, **fail} for a in (3, 4, 5))]))  # fmt: skip
    # Its first attempt's driver was killed; the second is running now.
    run.write_status(SubjectStatus("in-flight", "training", 2))
    # Its class images could not be made: it failed before any attempt.
    run.write_status(SubjectStatus("no-class-set", "failed", 0, "class images for 'a dog' could not be made"))
    for sid in mates:
        run.write_status(SubjectStatus(sid, "done", 2))
    html = Path(run_report.write_run_report(run.uri)).read_text()

    assert headline(html, "big-pack") == "big-pack done"
    assert history(html, "big-pack")[0] == "1 train ok 20 steps · packed with m00, m01, m02, m03, m04, m05 and 3 more"
    assert headline(html, "render-fails") == "render-fails failed · 3 retries"
    assert "Failed after 3 generation attempts:" in text(card(html, "render-fails"))
    assert headline(html, "in-flight") == "in-flight training · 1 retry"
    assert history(html, "in-flight") == ["1 train interrupted no outcome recorded",
                                          "2 train running or interrupted no outcome recorded"]  # fmt: skip
    assert headline(html, "no-class-set") == "no-class-set failed"
    assert "Failed: class images for" in text(card(html, "no-class-set"))
    assert headline(html, "m00") == "m00 done"


def test_a_missing_image_and_a_changed_or_missing_manifest_are_noted_not_fatal(tmp_path):
    built = build_run(str(tmp_path))
    os.remove(tmp_path / "run" / "subjects" / "beta" / "images" / "p0000-i0000.png")
    html = Path(run_report.write_run_report(built["run"])).read_text()
    assert "image unavailable" in html and "no such file" in html
    write_subjects_manifest(str(tmp_path / "subjects.parquet"), [
        {"subject_id": "alpha", "instance_images": built["instance"]["alpha"], "instance_prompt": "a photo of sks ball",
         "class_prompt": "a photo of a ball"},
    ])  # fmt: skip
    html = Path(run_report.write_run_report(built["run"])).read_text()
    assert "changed since the run" in html
    assert len(Elements(html).with_class("instance")) == 3  # alpha's, as the manifest lists them now

    os.remove(tmp_path / "subjects.parquet")
    html = Path(run_report.write_run_report(built["run"])).read_text()
    assert "manifest unreadable" in html
    assert Elements(html).with_class("instance") == []
    assert len(Elements(html).with_class("subject-card")) == 3


def test_a_run_on_an_object_store_gets_its_report_there(tmp_path):
    base = f"memory://{tmp_path.name}"
    built = build_run(base)
    out = run_report.write_run_report(built["run"])
    assert out == f"{base}/run/report.html"
    html = storage.read_bytes(out).decode()
    assert len(Elements(html).with_class("generated")) == 5
    assert len(storage.listdir(f"{base}/run/report_files/thumbs")) == 14
    storage.remove(base)


def test_a_large_run_is_split_into_linked_pages_quickly(tmp_path):
    run = RunDirectory(str(tmp_path / "big"))
    run.start(command="run", manifest_uri=str(tmp_path / "gone.parquet"), manifest_fingerprint="0",
              settings=load_settings("tiny"), base_model="tiny", base_model_path="/x", extend=False)  # fmt: skip
    for i in range(450):
        state, error = ("failed", f"boom {i}") if i % 50 == 0 else ("done", None)
        run.write_status(SubjectStatus(f"s{i:04d}", state, 1, error))
    (tmp_path / "big" / "report-5.html").write_text("left by an earlier, larger report")

    began = time.perf_counter()
    first = Path(run_report.write_run_report(run.uri))
    assert time.perf_counter() - began < 10

    pages = sorted(p.name for p in first.parent.glob("report*.html"))
    assert pages == ["report-2.html", "report-3.html", "report.html"]
    parsed = {name: Elements((first.parent / name).read_text()) for name in pages}
    assert [len(parsed[n].with_class("subject-card")) for n in ("report.html", "report-2.html", "report-3.html")] == [
        200, 200, 50]  # fmt: skip
    links = {name: ({a["href"] for a in e.named("a") if a.get("rel") == "prev"},
                    {a["href"] for a in e.named("a") if a.get("rel") == "next"}) for name, e in parsed.items()}  # fmt: skip
    assert links == {"report.html": (set(), {"report-2.html"}), "report-2.html": ({"report.html"}, {"report-3.html"}),
                     "report-3.html": ({"report-2.html"}, set())}  # fmt: skip
    # The failures on page 1 link to their cards on whichever page holds them.
    assert 'href="report-3.html#subject-s0400"' in (first.parent / "report.html").read_text()


def test_loss_curve_skips_non_finite_losses_and_thins_long_logs():
    assert run_report.loss_curve([]) is None
    assert run_report.loss_curve([{"step": 1, "loss": float("nan")}]) is None
    curve = run_report.loss_curve([{"step": s, "loss": 2.0 - s / 5000} for s in range(1, 5001)])
    points = curve.points.split()
    assert len(points) <= run_report.LOSS_MAX_POINTS + 1
    assert (curve.first_step, curve.last_step, curve.final) == (1, 5000, 1.0)
    xs = [float(p.split(",")[0]) for p in points]
    ys = [float(p.split(",")[1]) for p in points]
    assert xs == sorted(xs) and ys == sorted(ys)  # falling loss is drawn going down the box, i.e. y increasing
    assert xs[-1] == run_report.LOSS_WIDTH - 4


# -- evaluation scores (RUN/evaluation.parquet and each status.json's `evaluation`) ----------------------------------


EVALUATION_SCHEMA = pa.schema([("id", pa.string()), ("subject_id", pa.string()), ("prompt", pa.string()),
                               ("prompt_index", pa.int32()), ("image_index", pa.int32()), ("image", pa.string()),
                               ("class_prompt", pa.bool_()), ("dino", pa.float64()), ("clip_i", pa.float64()),
                               ("clip_t", pa.float64()), ("error", pa.string()), ("dino_model", pa.string()),
                               ("clip_model", pa.string())])  # fmt: skip
# Per image of build_run's (and alpha's class-prompt image, added below): dino, clip_i, clip_t, error.
IMAGE_SCORES = {"alpha/p0000-i0000": (0.71, 0.80, 0.31, None), "alpha/p0000-i0001": (0.69, 0.81, 0.30, None),
                "alpha/p0001-i0000": (0.73, 0.796, 0.293, None), "alpha/p0001-i0001": (None, None, None, SCRIPT),
                "alpha/p0002-i0000": (0.35, 0.52, 0.28, None), "beta/p0000-i0000": (0.38, 0.611, 0.15, None)}
# What the pass wrote into each status.json: beta, second by name, has the lower DINO and CLIP-T under its floor.
SUBJECT_MEANS = {
    "alpha": {"images": 4, "errors": 1, "dino": 0.71, "clip_i": 0.802, "clip_t": 0.301, "pres": 0.35,
              "class_images": 1},
    "beta": {"images": 1, "errors": 0, "dino": 0.38, "clip_i": 0.611, "clip_t": 0.15, "pres": None,
             "class_images": 0},
}  # fmt: skip
EVALUATED_AT = "2026-12-02T10:00:00+00:00"
# The models whose scores the paper's floors hold for (run_report.FLOORS); other models are flagged by quartile alone.
PAPER_MODELS = {"dino_model": "facebook/dino-vits16", "clip_model": "openai/clip-vit-large-patch14"}


def add_evaluation(built: dict, part_files: list[bytes] | None = None) -> None:
    """What `dreamfleet evaluate` leaves in build_run's run: alpha also rendered its class prompt, every image is in
    evaluation.parquet (or `part_files` are, as given), and each rendered subject's status.json has its means."""
    run = RunDirectory(built["run"])
    image = storage.join(built["run"], "subjects", "alpha", "images", "p0002-i0000.png")
    storage.write_bytes(image, png((90, 90, 90), size=(96, 96)))
    rows = [*built["generations"], {**built["generations"][0], "id": "alpha/p0002-i0000", "prompt": "a photo of a ball",
                                    "prompt_index": 2, "seed": 2000, "image": image}]  # fmt: skip
    generations = pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA)
    write_parquet(storage.join(built["run"], "generations.parquet"), generations)
    scored = [{**{k: row[k] for k in EVALUATION_SCHEMA.names if k in row}, "class_prompt": row["prompt_index"] == 2,
               **dict(zip(("dino", "clip_i", "clip_t", "error"), IMAGE_SCORES[row["id"]])),
               **PAPER_MODELS} for row in rows]  # fmt: skip
    table = pa.Table.from_pylist(scored, schema=EVALUATION_SCHEMA)
    for k, data in enumerate(part_files or [table.slice(0, 3), table.slice(3)]):
        if isinstance(data, pa.Table):
            write_parquet(storage.join(built["run"], "evaluation.parquet", f"part-{k}.parquet"), data)
        else:
            storage.write_bytes(storage.join(built["run"], "evaluation.parquet", f"part-{k}.parquet"), data)
    for sid, means in SUBJECT_MEANS.items():
        status = run.read_status(sid)
        status.evaluation = {**means, **PAPER_MODELS, "evaluated_at": EVALUATED_AT}
        run.write_status(status)


def figure(html: str, image_id: str) -> str:
    """A generated image's figure (thumbnail and caption), as the page's HTML."""
    start = html.index(f'<figure title="{image_id}">')
    return html[start : html.index("</figure>", start)]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> dict:
    built = build_run(str(tmp_path_factory.mktemp("evaluated")))
    add_evaluation(built)
    built["report"] = Path(run_report.write_run_report(built["run"]))
    return built


def test_a_user_sees_the_worst_subject_first_and_each_cards_means_and_image_scores(evaluated_run, chromium, tmp_path):
    dom = dump_dom(chromium, tmp_path, evaluated_run["report"])
    elements = Elements(dom)
    assert elements.named("script") == [] and not [attrs for _, attrs in elements.tags if "onerror" in attrs]
    assert "evaluated<b>2</b>" in dom and "low scores<b>1</b>" in dom
    # Page 1 lists the evaluated subjects worst first, each linked to its card, saying why the flagged one is flagged.
    scores = dom[dom.index('<section id="scores">') : dom.index("</section>", dom.index('<section id="scores">'))]
    ranked = [text(row.split("</tr>")[0]) for row in re.split(r'<tr class="ranked[^"]*">', scores)[1:]]
    assert ranked == ["beta 0.380 0.611 0.150 — 1 ⚑ DINO 0.380 under 0.50; CLIP-T 0.150 under 0.20",
                      "alpha 0.710 0.802 0.301 0.350 4 + 1 not scored"]  # fmt: skip
    assert [a["href"] for a in Elements(scores).named("a")] == ["report.html#subject-beta", "report.html#subject-alpha"]
    rule = text(scores[scores.index('<p class="flag-rule">') :].split("</p>")[0])
    assert "⚑ low score flags a subject whose mean DINO is under 0.50, or whose mean CLIP-T is under 0.20" in rule
    assert "flagged once 4 subjects are evaluated" in rule
    # The flagged card is marked where a reader scrolling the cards sees it, its headline.
    assert [c["id"] for c in elements.with_class("card-low-score")] == ["subject-beta"]
    assert headline(dom, "beta") == "beta done · 2 retries ⚑ low score" and headline(dom, "alpha") == "alpha done"
    beta = text(card(dom, "beta"))
    flag, means = "⚑ DINO 0.380 under 0.50; CLIP-T 0.150 under 0.20", "DINO 0.380 CLIP-I 0.611 CLIP-T 0.150"
    assert f"{flag} {means} 1 image scored" in beta
    assert "PRES" not in beta  # beta rendered no class prompt
    alpha = text(card(dom, "alpha"))
    assert "DINO 0.710 CLIP-I 0.802 CLIP-T 0.301 PRES 0.350 (lower is better)" in alpha
    assert "4 images scored (1 from the class prompt), 1 not scored · DINO model facebook/dino-vits16" in alpha
    assert "evaluation" not in card(dom, "gamma")  # failed, never evaluated
    # Each image's own scores are under its thumbnail; an unscored one says why, the class-prompt group what it is.
    assert text(figure(dom, "alpha/p0000-i0000")).endswith("DINO 0.710 · CLIP-I 0.800 · CLIP-T 0.310")
    assert "not scored: &lt;script&gt;alert(1)&lt;/script&gt;" in figure(dom, "alpha/p0001-i0001")
    assert '<span class="score low">CLIP-T 0.150</span>' in figure(dom, "beta/p0000-i0000")
    assert '<span class="score">DINO 0.350</span>' in figure(dom, "alpha/p0002-i0000")  # low is good for PRES
    assert "a photo of a ball class prompt: its DINO is PRES, lower is better" in text(card(dom, "alpha"))
    assert len(elements.with_class("scores")) == 6 and elements.with_class("note") == []


def test_a_run_without_evaluation_shows_no_scores_and_a_broken_table_is_a_note(small_run, tmp_path):
    body = small_run["report"].read_text().split("<body>")[1]  # the stylesheet has the classes scores would use
    for absent in ('id="scores"', "evaluation", "evaluated", "low score", "DINO", 'class="scores'):
        assert absent not in body
    built = build_run(str(tmp_path))
    before = Path(run_report.write_run_report(built["run"])).read_text()
    add_evaluation(built, part_files=[b"PAR1 not really parquet"])
    html = Path(run_report.write_run_report(built["run"])).read_text()
    assert "evaluation.parquet: unreadable, left out" in text("".join(re.findall(r'<div class="note">.*?</div>', html)))
    assert 'class="scores' not in html  # no image's scores...
    assert "DINO 0.710 CLIP-I 0.802" in text(card(html, "alpha"))  # ...but the means status.json holds
    # Take the evaluation away again and the report is what it was before, byte for byte.
    shutil.rmtree(tmp_path / "run" / "evaluation.parquet")
    run = RunDirectory(built["run"])
    for sid in SUBJECT_MEANS:
        status = run.read_status(sid)
        status.evaluation = None
        run.write_status(status)
    os.remove(tmp_path / "run" / "subjects" / "alpha" / "images" / "p0002-i0000.png")
    write_parquet(storage.join(built["run"], "generations.parquet"),
                  pa.Table.from_pylist(built["generations"], schema=GENERATIONS_SCHEMA))  # fmt: skip
    assert Path(run_report.write_run_report(built["run"])).read_text() == before


def test_scores_rank_and_flag_the_lowest_quarter_across_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(run_report, "SUBJECTS_PER_PAGE", 4)
    monkeypatch.setattr(run_report, "WORST_LISTED", 5)
    run = RunDirectory(str(tmp_path / "ranked"))
    run.start(command="run", manifest_uri=str(tmp_path / "gone.parquet"), manifest_fingerprint="0",
              settings=load_settings("tiny"), base_model="tiny", base_model_path="/x", extend=False)  # fmt: skip
    stamp = {"errors": 0, "clip_i": 0.8, "pres": None, "class_images": 0, "dino_model": "dino-s16",
             "clip_model": "clip-l14", "evaluated_at": EVALUATED_AT}  # fmt: skip
    dino = [0.90, 0.62, 0.85, 0.80, 0.75, 0.70, 0.66, 0.95]  # other models than the paper's: no floor, quartiles
    for i, d in enumerate(dino):
        run.write_status(SubjectStatus(f"s{i}", "done", 2, evaluation={**stamp, "images": 4, "dino": d, "clip_t": 0.3}))
    # Nothing scored; a DINO that is no number (shown as a dash, not as text); scored with other models.
    run.write_status(SubjectStatus("t-none", "done", 2, evaluation={**stamp, "images": 0, "errors": 4, "dino": None,
                                                                    "clip_t": None}))  # fmt: skip
    run.write_status(SubjectStatus("t-text", "done", 2, evaluation={**stamp, "images": 4, "dino": "<b>1</b>",
                                                                    "clip_t": 0.3}))  # fmt: skip
    run.write_status(SubjectStatus("u-other", "done", 2, evaluation={**stamp, "images": 4, "dino": 0.99, "clip_t": 0.3,
                                                                     "dino_model": "<b>dino-b8</b>"}))  # fmt: skip
    run.write_status(SubjectStatus("v-never", "done", 2))
    html = Path(run_report.write_run_report(run.uri)).read_text()
    scores = html[html.index('<section id="scores">') :].split("</section>")[0]
    rows = re.split(r'<tr class="ranked[^"]*">', scores)[1:]
    assert [Elements(r).named("a")[0]["href"] for r in rows] == [
        "report-3.html#subject-t-none", "report.html#subject-s1", "report-2.html#subject-s6",
        "report-3.html#subject-t-text", "report-2.html#subject-s5"]  # fmt: skip
    assert text(rows[0]).endswith("⚑ no image could be scored")
    assert text(rows[1]).endswith("⚑ DINO 0.620 in the run&#39;s lowest quarter (under 0.700)")
    # Then the unflagged, lowest DINO first (one with no DINO to show first of all, its value a dash, not its text).
    assert text(rows[3]) == "t-text — 0.800 0.300 — 4" and text(rows[4]).startswith("s5 0.700")
    assert "first quartile, 0.700 over 9 subjects" in text(scores)  # the 8 and u-other; t-none and t-text have none
    assert "These are the 5 lowest of 11 evaluated subjects" in text(scores)
    assert ("scored with different models (DINO &lt;b&gt;dino-b8&lt;/b&gt; and CLIP clip-l14; DINO dino-s16 and CLIP "
            "clip-l14)") in html  # a model name from a file is text
    assert "under 0.50" not in scores  # the paper's floors hold for the paper's models only
    page2 = (tmp_path / "ranked" / "report-2.html").read_text()
    assert 'id="scores"' not in page2 and headline(page2, "s6") == "s6 done ⚑ low score"
