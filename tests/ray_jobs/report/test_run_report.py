"""`dreamfleet report`: run directories and VLM outputs built by hand (no Ray), their reports opened in Chromium."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageStat

from engine import storage
from engine.settings import load_settings
from ray_jobs.report import run_report as report
from ray_jobs.state.generations import SCHEMA as GENERATIONS_SCHEMA
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory, SubjectStatus

SCRIPT = "<script>alert(1)</script>"
# Would change the page if it ever reached the DOM as markup (and scripts ran); the report must show it as text.
INJECTED = "<img src=x onerror=\"document.title='pwned'\">"
SCRIPT_PROMPT = f"a photo of sks ball {SCRIPT}"
FAILURE = "<b>CUDA</b> out of memory after 3 attempts"
PACK = "node1-42-1"  # a pack id as the worker makes them: node, pid, the worker's nth pack
MODERATION_COLUMNS = [("error", pa.string()), ("model", pa.string()), ("num_output_tokens", pa.int32()),
                      ("reasoning", pa.string()), ("safe", pa.bool_()), ("categories", pa.list_(pa.string())),
                      ("score", pa.float64())]  # fmt: skip


# -- Chromium, as a user's browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (CI installs it in .ci/run)")
    return found


def run_chromium(chromium: str, tmp_path: Path, url: str, *flags: str) -> str:
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *flags, url]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dump_dom(chromium: str, tmp_path: Path, page: Path) -> str:
    return run_chromium(chromium, tmp_path, page.as_uri(), "--dump-dom")


class Elements(HTMLParser):
    """Every start tag of a page with its attributes, and the text inside elements of a given class."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def with_class(self, css: str) -> list[dict[str, str]]:
        return [attrs for _, attrs in self.tags if css in attrs.get("class", "").split()]

    def named(self, tag: str) -> list[dict[str, str]]:
        return [attrs for t, attrs in self.tags if t == tag]


# -- a run directory, built by hand ----------------------------------------------------------------------------------


def png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64), shift: int = 0) -> bytes:
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).ellipse((8 + shift, 8, 40 + shift, 40), fill=(240, 200, 20))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def build_run(base: str) -> dict:
    """A finished run of three subjects: alpha (two prompts, one with a script in it), beta, and gamma (failed)."""
    run_uri = storage.join(base, "run")
    settings = load_settings("tiny")
    instance = {}
    for n, sid in enumerate(("alpha", "beta", "gamma")):
        instance[sid] = [storage.join(base, "photos", f"{sid}-{i}.png") for i in range(3)]
        for i, uri in enumerate(instance[sid]):
            storage.write_bytes(uri, png((30 + 80 * n, 60, 200), shift=i))
    manifest = storage.join(base, "subjects.parquet")
    write_subjects_manifest(manifest, [
        {"subject_id": "alpha", "instance_images": instance["alpha"], "instance_prompt": "a photo of sks ball",
         "class_prompt": "a photo of a ball", "prompts": ["a photo of sks ball on a table", SCRIPT_PROMPT]},
        {"subject_id": "beta", "instance_images": instance["beta"], "instance_prompt": "a photo of sks cup",
         "class_prompt": "a photo of a cup", "prompts": ["a photo of sks cup"]},
        {"subject_id": "gamma", "instance_images": instance["gamma"], "instance_prompt": "a photo of sks hat",
         "class_prompt": "a photo of a hat", "prompts": ["a photo of sks hat"]},
    ])  # fmt: skip
    run = RunDirectory(run_uri)
    fingerprint = hashlib.sha256(storage.read_bytes(manifest)).hexdigest()
    run.start(command="run", manifest_uri=manifest, manifest_fingerprint=fingerprint, settings=settings,
              base_model="tiny", base_model_path="/cache/tiny", extend=False)  # fmt: skip
    prompts = {"alpha": ["a photo of sks ball on a table", SCRIPT_PROMPT], "beta": ["a photo of sks cup"]}
    rows = []
    # alpha trained and rendered first time, in a pack with beta; beta's worker died in that pack, the driver was
    # killed during its second attempt (no outcome recorded), and its third trained it alone.
    run.write_status(SubjectStatus("alpha", "done", 2, history=[
        {"attempt": 1, "stage": "train", "ok": True, "steps_run": 20, "seconds": 3.5, "pack": PACK,
         "pack_mates": ["beta"]},
        {"attempt": 2, "stage": "generate", "ok": True, "images_generated": 2, "seconds": 1.0},
    ]))  # fmt: skip
    run.write_status(SubjectStatus("beta", "done", 4, history=[
        {"attempt": 1, "stage": "train", "ok": False, "error": "worker process died: ActorDiedError", "pack": PACK,
         "pack_mates": ["alpha"]},
        {"attempt": 3, "stage": "train", "ok": True, "steps_run": 10, "resumed_from": 10, "seconds": 2.0,
         "pack": "node2-77-1", "pack_mates": []},
        {"attempt": 4, "stage": "generate", "ok": True, "images_generated": 1, "seconds": 1.0},
    ]))  # fmt: skip
    for sid, subject_prompts in prompts.items():
        log = [{"step": s, "loss": 1.0 / s + 0.1, "instance_loss": 0.5, "prior_loss": 0.5, "lr": 1e-4, "seconds": 0.1}
               for s in range(1, 21)]  # fmt: skip
        storage.write_bytes(storage.join(run_uri, "subjects", sid, "train_log.jsonl"),
                            "".join(json.dumps(r) + "\n" for r in log).encode())  # fmt: skip
        for p, prompt in enumerate(subject_prompts):
            for i in range(2 if sid == "alpha" else 1):
                image = storage.join(run_uri, "subjects", sid, "images", f"p{p:04d}-i{i:04d}.png")
                storage.write_bytes(image, png((200, 40 * p, 40 * i), size=(96, 96)))
                rows.append({"id": f"{sid}/p{p:04d}-i{i:04d}", "subject_id": sid, "prompt": prompt, "prompt_index": p,
                             "image_index": i, "seed": 1000 * p + i, "image": image, "guidance_scale": 7.5,
                             "num_inference_steps": 10, "scheduler": "ddim"})  # fmt: skip
    run.write_status(SubjectStatus("gamma", "failed", 3, FAILURE, history=[
        {"attempt": a, "stage": "train", "ok": False, "error": FAILURE} for a in (1, 2, 3)]))  # fmt: skip
    run.write_rejected_rows([{"row": 3, "subject_id": "bad id", "reason": "invalid subject_id 'bad id'"}])
    write_parquet(storage.join(run_uri, "generations.parquet"), pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA))
    verdicts = [(False, ["S1", "S10"], 0.91, None), (True, [], 0.02, None), (True, [], 0.05, None),
                (None, None, None, "image decode failed"), (True, [], 0.01, None)]  # fmt: skip
    moderation = [{**row, "error": error, "model": "tiny", "num_output_tokens": 6, "reasoning": None, "safe": safe,
                   "categories": categories, "score": score}
                  for row, (safe, categories, score, error) in zip(rows, verdicts)]  # fmt: skip
    schema = pa.schema([*GENERATIONS_SCHEMA, *MODERATION_COLUMNS])
    table = pa.Table.from_pylist(moderation, schema=schema)
    for k in range(2):  # a pass output: a folder of part files
        write_parquet(storage.join(run_uri, "moderation.parquet", f"part-{k}.parquet"), table.slice(3 * k, 3))
    run.finish({"done": 2, "failed": 1})
    return {"run": run_uri, "generations": rows, "instance": instance}


def write_parquet(uri: str, table: pa.Table) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue().to_pybytes())


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> dict:
    built = build_run(str(tmp_path_factory.mktemp("report")))
    built["report"] = Path(report.write_run_report(built["run"]))
    return built


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


def text(html: str) -> str:
    """What a reader sees of an HTML fragment: block tags as spaces, inline ones dropped, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", "", re.sub(r"</?(?:tr|td|th|pre|div|h3|p)\b[^>]*>", " ", html)).split())


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
    html = Path(report.write_run_report(run.uri)).read_text()

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


def test_thumbnails_are_files_beside_the_report_reused_by_a_rerun(small_run):
    thumbs = small_run["report"].parent / "report_files" / "thumbs"
    made = {p.name: p.stat().st_mtime_ns for p in thumbs.iterdir()}
    assert len(made) == 3 * 3 + 5  # every instance image and every generated one
    assert all(Image.open(thumbs / name).size[0] <= report.THUMBNAIL_SIZE for name in made)
    html = small_run["report"].read_text()
    assert "data:image" not in html and "base64" not in html
    srcs = [img["src"] for img in Elements(html).named("img")]
    assert srcs and all(src.startswith("report_files/thumbs/") for src in srcs)  # relative: the folder can move
    assert 'href="subjects/alpha/images/p0000-i0000.png"' in html  # a thumbnail opens the full-size image

    time.sleep(0.01)
    report.write_run_report(small_run["run"])
    assert {p.name: p.stat().st_mtime_ns for p in thumbs.iterdir()} == made


def test_a_missing_image_and_a_changed_or_missing_manifest_are_noted_not_fatal(tmp_path):
    built = build_run(str(tmp_path))
    os.remove(tmp_path / "run" / "subjects" / "beta" / "images" / "p0000-i0000.png")
    html = Path(report.write_run_report(built["run"])).read_text()
    assert "image unavailable" in html and "no such file" in html
    write_subjects_manifest(str(tmp_path / "subjects.parquet"), [
        {"subject_id": "alpha", "instance_images": built["instance"]["alpha"], "instance_prompt": "a photo of sks ball",
         "class_prompt": "a photo of a ball"},
    ])  # fmt: skip
    html = Path(report.write_run_report(built["run"])).read_text()
    assert "changed since the run" in html
    assert len(Elements(html).with_class("instance")) == 3  # alpha's, as the manifest lists them now

    os.remove(tmp_path / "subjects.parquet")
    html = Path(report.write_run_report(built["run"])).read_text()
    assert "manifest unreadable" in html
    assert Elements(html).with_class("instance") == []
    assert len(Elements(html).with_class("subject-card")) == 3


def test_a_run_on_an_object_store_gets_its_report_there(tmp_path):
    base = f"memory://{tmp_path.name}"
    built = build_run(base)
    out = report.write_run_report(built["run"])
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
    first = Path(report.write_run_report(run.uri))
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


def test_links_are_relative_inside_the_report_folder_and_never_scripts():
    layout = report.ReportLayout("file:///runs/r1/report.html")
    assert layout.link("/runs/r1/subjects/a b/images/p0.png") == "subjects/a%20b/images/p0.png"
    assert layout.link("file:///runs/r1/subjects/a/images/p0.png") == "subjects/a/images/p0.png"
    assert layout.link("/photos/dog.png") == "file:///photos/dog.png"
    assert layout.link("s3://bucket/photos/dog.png") == "s3://bucket/photos/dog.png"
    assert layout.link("javascript://%0aalert(1)") is None
    assert layout.thumb_link("abc.jpg") == "report_files/thumbs/abc.jpg"


def test_loss_curve_skips_non_finite_losses_and_thins_long_logs():
    assert report.loss_curve([]) is None
    assert report.loss_curve([{"step": 1, "loss": float("nan")}]) is None
    curve = report.loss_curve([{"step": s, "loss": 2.0 - s / 5000} for s in range(1, 5001)])
    points = curve.points.split()
    assert len(points) <= report.LOSS_MAX_POINTS + 1
    assert (curve.first_step, curve.last_step, curve.final) == (1, 5000, 1.0)
    xs = [float(p.split(",")[0]) for p in points]
    ys = [float(p.split(",")[1]) for p in points]
    assert xs == sorted(xs) and ys == sorted(ys)  # falling loss is drawn going down the box, i.e. y increasing
    assert xs[-1] == report.LOSS_WIDTH - 4


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
# The models whose scores the paper's floors hold for (report.FLOORS); other models are flagged by quartile alone.
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
    built["report"] = Path(report.write_run_report(built["run"]))
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
    before = Path(report.write_run_report(built["run"])).read_text()
    add_evaluation(built, part_files=[b"PAR1 not really parquet"])
    html = Path(report.write_run_report(built["run"])).read_text()
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
    assert Path(report.write_run_report(built["run"])).read_text() == before


def test_scores_rank_and_flag_the_lowest_quarter_across_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "SUBJECTS_PER_PAGE", 4)
    monkeypatch.setattr(report, "WORST_LISTED", 5)
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
    html = Path(report.write_run_report(run.uri)).read_text()
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


# -- the table report ------------------------------------------------------------------------------------------------


def test_the_moderation_table_report_counts_errors_and_categories(tmp_path):
    image = tmp_path / "img.png"
    image.write_bytes(png((20, 120, 20)))
    errors = ["image decode failed"] * 5 + ["timeout"] * 3 + [f"rare error {i}" for i in range(12)]
    rows = [{"id": f"e{i}", "image": str(image), "error": e, "model": "tiny", "num_output_tokens": 0, "reasoning": None,
             "safe": None, "categories": None, "score": None} for i, e in enumerate(errors)]  # fmt: skip
    rows += [{"id": f"ok{i}", "image": str(image), "error": None, "model": "tiny", "num_output_tokens": 6,
              "reasoning": None, "safe": i % 3 != 0, "categories": ["S1", "S12"] if i % 3 == 0 else [],
              "score": 0.9 if i % 3 == 0 else 0.1} for i in range(30)]  # fmt: skip
    output = tmp_path / "moderated.parquet"  # a pass output: part files in a folder named like a file
    output.mkdir()
    table = pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("image", pa.string()),
                                                         *MODERATION_COLUMNS]))  # fmt: skip
    for k, start in enumerate(range(0, table.num_rows, 17)):
        pq.write_table(table.slice(start, 17), output / f"part-{k}.parquet")

    page = Path(report.write_table_report(str(output)))
    assert page == tmp_path / "moderated.report.html"
    html = page.read_text()
    assert "rows<b>50</b>" in html and "errors<b>20</b>" in html and "40.0%" in html
    assert "flagged<b>10</b>" in html and "safe<b>20</b>" in html
    top_rows = html.split('<tr class="top-error">')[1:]
    assert len(top_rows) == report.TOP_ERRORS
    assert top_rows[0].startswith("<td>5</td><td><pre>image decode failed")
    assert top_rows[1].startswith("<td>3</td><td><pre>timeout")
    assert "(10 of 14 distinct)" in html
    assert '<tr class="category"><td>S1</td><td>10</td></tr>' in html
    assert '<tr class="category"><td>S12</td><td>10</td></tr>' in html
    assert len(Elements(html).with_class("sample-image")) == report.SAMPLE_ROWS
    assert len(list((tmp_path / "moderated.report_files" / "thumbs").iterdir())) == 1  # one image, one thumbnail


def test_the_ocr_table_report_shows_text_as_text(tmp_path, chromium):
    text = f"TOTAL 12.50 EUR\n{SCRIPT}\n{INJECTED}\x00end"
    rows = [{"id": f"doc-{i}", "image_bytes": png((250, 250, 250), shift=i), "error": None, "model": "tiny",
             "num_output_tokens": 40, "reasoning": None, "text": text} for i in range(3)]  # fmt: skip
    rows.append({"id": SCRIPT, "image_bytes": b"not an image", "error": "cannot decode image", "model": "tiny",
                 "num_output_tokens": 0, "reasoning": None, "text": None})  # fmt: skip
    output = tmp_path / "ocr.parquet"
    pq.write_table(pa.Table.from_pylist(rows), output)

    page = Path(report.write_table_report(str(output)))
    dom = dump_dom(chromium, tmp_path, page)
    elements = Elements(dom)
    assert elements.named("script") == []
    assert not [attrs for _, attrs in elements.tags if "onerror" in attrs]
    assert "<title>dreamfleet VLM output" in dom and "pwned" not in dom.split("</title>")[0]
    shown = "TOTAL 12.50 EUR\n&lt;script&gt;alert(1)&lt;/script&gt;\n&lt;img src=x onerror=\"document.title='pwned'\"&gt;\ufffdend"
    assert dom.count(f'<pre class="ocr-text">{shown}</pre>') == 3
    assert "<td><code>&lt;script&gt;alert(1)&lt;/script&gt;</code></td>" in dom  # the id, too
    assert "\x00" not in page.read_text()
    assert len(list((tmp_path / "ocr.report_files" / "thumbs").iterdir())) == 3  # the bad row's image has none
    assert "errors<b>1</b>" in dom and "25.0%" in dom


# -- the command -----------------------------------------------------------------------------------------------------


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dreamfleet")
    report.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_the_report_command_takes_a_run_or_a_parquet_file_and_nothing_else(small_run, tmp_path, capsys):
    assert run_command(["report", small_run["run"]]) == 0
    assert capsys.readouterr().out.strip() == report.report_path_for(small_run["run"])
    out = tmp_path / "elsewhere" / "moderation.html"
    assert run_command(["report", storage.join(small_run["run"], "moderation.parquet"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.exists()

    manifest = storage.join(small_run["run"], "..", "subjects.parquet")  # any Parquet file, even without VLM columns
    assert run_command(["report", manifest]) == 0
    assert "rows<b>3</b>" in Path(capsys.readouterr().out.strip()).read_text()

    (tmp_path / "notes.txt").write_text("hello")
    for path, message in [(tmp_path / "notes.txt", "neither a run directory"), (tmp_path, "neither run.json nor Parquet part files"),
                          (tmp_path / "absent", "no such file")]:  # fmt: skip
        assert run_command(["report", str(path)]) == 2
        assert message in capsys.readouterr().err


# -- answers, boxes, pages and videos (vqa, detect, parse; PDF and video rows) ----------------------------------------

BOX = pa.struct([("label", pa.string()), ("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.float64()),
                 ("y2", pa.float64())])  # fmt: skip
VLM_COLUMNS = [("id", pa.string()), ("image", pa.string()), ("image_bytes", pa.binary()), ("video", pa.string()),
               *MODERATION_COLUMNS[:4], ("page", pa.int32())]  # fmt: skip
YELLOW, CYAN, GREY = (255, 230, 0), (0, 220, 255), (128, 128, 128)
# Where the test photo's patches are, in pixels of the photo as it is seen (upright): it is 300 x 500 upright.
PHOTO_SIZE = (300, 500)
DOG, CAT = (40.0, 300.0, 160.0, 450.0), (180.0, 40.0, 280.0, 140.0)


def exif_rotated_photo(path: Path) -> Path:
    """A portrait photo stored on its side with EXIF orientation 6 (rotate 90° clockwise to view), as phones save it:
    a yellow patch at DOG and a cyan one at CAT once it is upright."""
    upright = Image.new("RGB", PHOTO_SIZE, GREY)
    ImageDraw.Draw(upright).rectangle(DOG, fill=YELLOW)
    ImageDraw.Draw(upright).rectangle(CAT, fill=CYAN)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: the viewer turns it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, "JPEG", quality=95, exif=exif)
    return path


def two_page_pdf(path: Path) -> Path:
    """Page 1: 300 x 200 pt, red. Page 2: 200 x 400 pt, blue with a yellow patch at (50, 100)-(150, 200) pt."""
    first = Image.new("RGB", (300, 200), (220, 30, 30))
    second = Image.new("RGB", (200, 400), (30, 30, 220))
    ImageDraw.Draw(second).rectangle((50, 100, 150, 200), fill=YELLOW)
    first.save(path, "PDF", save_all=True, append_images=[second], resolution=72)  # 1 px = 1 pt
    return path


def red_video(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for _ in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), (220, 30, 30), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def pass_output(path: Path, rows: list[dict], task_columns: list[tuple[str, pa.DataType]]) -> Path:
    """A pass output folder of two part files, in the SPEC's shapes: every input column, the standard ones, page."""
    schema = pa.schema([*VLM_COLUMNS, *task_columns])
    table = pa.Table.from_pylist([{"model": "tiny", "num_output_tokens": 5, **r} for r in rows], schema=schema)
    path.mkdir()
    half = (table.num_rows + 1) // 2
    pq.write_table(table.slice(0, half), path / "part-0.parquet")
    pq.write_table(table.slice(half), path / "part-1.parquet")
    return path


def sample_row(html: str, row_id: str, page: int | None = None) -> str:
    """The sample table's row of `row_id` (and `page`), as the page's HTML."""
    for row in html.split('<tr class="row">')[1:]:
        row = row.split("</tr>\n<tr class=\"row\">")[0]
        head = row.split("</td>")[0]
        if f"<code>{row_id}</code>" in head and (page is None or f"page {page}</span>" in head):
            return row
    raise AssertionError(f"no sample row {row_id!r} page {page}")


def thumbnail(page: Path, row_html: str) -> Image.Image:
    src = Elements(row_html).named("img")[0]["src"]
    return Image.open(page.parent / src).convert("RGB")


def near(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 60) -> bool:
    return sum(abs(a - b) for a, b in zip(pixel, colour)) <= tolerance


def drawn_boxes(row_html: str) -> tuple[str, list[dict[str, str]], list[str]]:
    """A row's SVG overlay: its viewBox, its rects' attributes, and the labels written on them."""
    elements = Elements(row_html)
    (svg,) = elements.named("svg")
    labels = re.findall(r"<text [^>]*>([^<]*)</text>", row_html)
    return svg["viewbox"], elements.named("rect"), labels


def rect_box(rect: dict[str, str]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(rect[k]) for k in ("x", "y", "width", "height"))
    return x, y, x + w, y + h


def box(label: str, corners: tuple[float, float, float, float]) -> dict:
    return {"label": label, **dict(zip(("x1", "y1", "x2", "y2"), corners))}


@pytest.fixture
def detections(tmp_path) -> dict:
    photo = exif_rotated_photo(tmp_path / "photo.jpg")
    pdf = two_page_pdf(tmp_path / "doc.pdf")
    small = io.BytesIO()
    Image.new("RGB", (64, 32), CYAN).save(small, "PNG")
    rows = [
        {"id": "photo", "image": str(photo), "categories": "dog, cat", "boxes": [box("dog", DOG), box("cat", CAT)]},
        {"id": "doc", "image": str(pdf), "page": 1, "categories": "dog", "boxes": []},
        # Page 2 at the pass's 144 dpi is 400 x 800 px; its patch is at (100, 200)-(300, 400) px.
        {"id": "doc", "image": str(pdf), "page": 2, "categories": "dog", "boxes": [box("dog", (100, 200, 300, 400))]},
        {"id": "bytes", "image_bytes": small.getvalue(), "categories": "cat", "boxes": [box("cat", (0, 0, 32, 32))]},
        {"id": "bad", "image": str(tmp_path / "gone.jpg"), "categories": "dog", "error": "no such file"},
    ]
    output = pass_output(tmp_path / "detected.parquet", rows,
                         [("categories", pa.string()), ("boxes", pa.list_(BOX))])  # fmt: skip
    return {"output": output, "page": Path(report.write_table_report(str(output)))}


def test_boxes_are_drawn_where_they_are_on_the_upright_photo(detections):
    page = detections["page"]
    html = page.read_text()
    row = sample_row(html, "photo")
    view_box, rects, labels = drawn_boxes(row)
    # The photo is stored 500 x 300 on its side: the boxes are drawn in its upright 300 x 500 pixels.
    assert view_box == "0 0 300 500"
    assert [rect_box(r) for r in rects] == [DOG, CAT]
    assert labels == ["dog", "cat"]
    assert rects[0]["stroke"] != rects[1]["stroke"]
    # The thumbnail under them is upright too, scaled: each box's middle, scaled to the thumbnail, is its patch.
    thumb = thumbnail(page, row)
    assert thumb.size == (115, 192)
    for (x1, y1, x2, y2), colour in ((DOG, YELLOW), (CAT, CYAN)):
        middle = ((x1 + x2) / 2 * thumb.width / 300, (y1 + y2) / 2 * thumb.height / 500)
        assert near(thumb.getpixel(middle), colour)
    assert "2 boxes: cat × 1, dog × 1" in text(row)
    assert "(looked for: dog, cat)" in text(row)


def test_boxes_on_a_pdf_page_are_in_pixels_of_the_page_at_the_pass_dpi(detections, tmp_path):
    page = detections["page"]
    html = page.read_text()
    first, second = sample_row(html, "doc", 1), sample_row(html, "doc", 2)
    assert "no box found" in text(first) and "<svg" not in first
    view_box, rects, labels = drawn_boxes(second)
    assert view_box == "0 0 400 800" and [rect_box(r) for r in rects] == [(100, 200, 300, 400)] and labels == ["dog"]
    thumb = thumbnail(page, second)
    assert thumb.size == (96, 192)  # page 2 itself, upright, not page 1 (landscape)
    assert near(thumb.getpixel((48, 72)), YELLOW) and near(thumb.getpixel((10, 10)), (30, 30, 220))
    assert near(thumbnail(page, first).getpixel((10, 10)), (220, 30, 30))
    # Boxes from a pass run at another pdf_dpi are drawn in pixels of the page at that resolution.
    other = Path(report.write_table_report(str(detections["output"]), str(tmp_path / "at72.html"), pdf_dpi=72))
    assert drawn_boxes(sample_row(other.read_text(), "doc", 2))[0] == "0 0 200 400"
    assert drawn_boxes(sample_row(other.read_text(), "photo"))[0] == "0 0 300 500"  # a photo is no PDF


def test_boxes_are_counted_per_label_and_the_categories_text_is_not_a_moderation_count(detections):
    html = detections["page"].read_text()
    assert "rows<b>5</b>" in html and "errors<b>1</b>" in html and "boxes<b>4</b>" in html
    assert "PDF pages<b>2</b>" in html
    assert '<tr class="box-label"><td>cat</td><td>2</td><td>2</td></tr>' in html
    assert '<tr class="box-label"><td>dog</td><td>2</td><td>2</td></tr>' in html
    assert "4 boxes in 4 answered rows" in html
    assert "Moderation categories" not in html  # detect's `categories` is its input's labels, not verdict codes
    assert drawn_boxes(sample_row(html, "bytes"))[0] == "0 0 64 32"
    assert "<svg" not in sample_row(html, "bad") and "image unavailable" in sample_row(html, "bad")


def test_a_rerun_reuses_the_thumbnails_and_still_draws_the_boxes_in_place(detections):
    thumbs = detections["page"].parent / "detected.report_files" / "thumbs"
    made = {p.name: p.stat().st_mtime_ns for p in thumbs.iterdir()}
    assert len(made) == 4  # the photo, each page of the PDF, the bytes
    time.sleep(0.01)
    html = Path(report.write_table_report(str(detections["output"]))).read_text()
    assert {p.name: p.stat().st_mtime_ns for p in thumbs.iterdir()} == made
    assert drawn_boxes(sample_row(html, "photo"))[0] == "0 0 300 500"
    assert drawn_boxes(sample_row(html, "doc", 2))[0] == "0 0 400 800"


def test_a_user_sees_each_box_around_its_patch(chromium, tmp_path):
    photo = exif_rotated_photo(tmp_path / "photo.jpg")
    rows = [{"id": "photo", "image": str(photo), "categories": "dog, cat", "boxes": [box("dog", DOG), box("cat", CAT)]}]
    output = pass_output(tmp_path / "one.parquet", rows, [("categories", pa.string()), ("boxes", pa.list_(BOX))])
    page = Path(report.write_table_report(str(output)))
    shot = tmp_path / "boxes.png"
    run_chromium(chromium, tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1000,1000",
                 "--hide-scrollbars", "--force-device-scale-factor=1")  # fmt: skip
    image = Image.open(shot).convert("RGB")
    pixels = np.asarray(image, dtype=np.int32)
    rects = drawn_boxes(sample_row(page.read_text(), "photo"))[1]
    for patch, rect in zip((YELLOW, CYAN), rects):
        stroke = tuple(int(rect["stroke"][i : i + 2], 16) for i in (1, 3, 5))
        # The patch as the screenshot shows it (the photo's thumbnail is the only place with its colour)...
        ys, xs = np.nonzero(np.abs(pixels - np.array(patch)).sum(axis=2) <= 40)
        left, top, right, bottom = xs.min(), ys.min(), xs.max(), ys.max()
        middle_x, middle_y = (left + right) // 2, (top + bottom) // 2
        # ...has the box's stroke on each of its four edges (the label is written inside, at the top left).
        edges = {"left": [(left + d, middle_y) for d in range(-3, 4)],
                 "right": [(right + d, middle_y) for d in range(-3, 4)],
                 "top": [(middle_x, top + d) for d in range(-3, 4)],
                 "bottom": [(middle_x, bottom + d) for d in range(-3, 4)]}  # fmt: skip
        for edge, around in edges.items():
            assert any(near(image.getpixel(p), stroke, 90) for p in around), (patch, edge)


def test_answers_show_their_questions_and_pages_and_videos_are_rows_of_their_own(tmp_path, chromium):
    photo = exif_rotated_photo(tmp_path / "photo.jpg")
    pdf = two_page_pdf(tmp_path / "doc.pdf")
    video = red_video(tmp_path / "clip.mp4")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 50)
    rows = [
        {"id": "photo", "image": str(photo), "question": "What is at the top right?",
         "answer": f"A cyan square {SCRIPT}"},
        {"id": "doc", "image": str(pdf), "page": 1, "question": "What colour is this page?", "answer": "Red."},
        {"id": "doc", "image": str(pdf), "page": 2, "question": "What colour is this page?", "answer": "Blue."},
        {"id": "clip", "video": str(video), "question": "What happens?", "answer": "The screen stays red."},
        {"id": "short", "image": str(pdf), "page": 3, "question": "And this one?", "answer": "Green."},
        {"id": "broken", "image": str(broken), "question": "Anything?", "error": "not a readable PDF"},
    ]
    output = pass_output(tmp_path / "answered.parquet", rows, [("question", pa.string()), ("answer", pa.string())])
    page = Path(report.write_table_report(str(output)))
    dom = dump_dom(chromium, tmp_path, page)
    assert Elements(dom).named("script") == []

    photo_row = sample_row(dom, "photo")
    assert "Q: What is at the top right? A: A cyan square &lt;script&gt;alert(1)&lt;/script&gt;" in text(photo_row)
    assert thumbnail(page, photo_row).size == (115, 192)  # upright
    first, second = sample_row(dom, "doc", 1), sample_row(dom, "doc", 2)
    assert "A: Red." in text(first) and "A: Blue." in text(second)
    assert '<span class="page">page 1</span>' in first and '<span class="page">page 2</span>' in second
    assert near(thumbnail(page, first).getpixel((5, 5)), (220, 30, 30))
    assert near(thumbnail(page, second).getpixel((5, 5)), (30, 30, 220))

    clip = sample_row(dom, "clip")
    assert "A: The screen stays red." in text(clip)
    assert 'href="clip.mp4"' in clip and f"<code>{video}</code>" in clip  # the video's URI, linked
    assert near(thumbnail(page, clip).getpixel((20, 20)), (220, 30, 30))  # its first frame
    # A page the PDF does not have and a PDF PDFium cannot open are notes on their rows, not a failed report.
    assert "image unavailable" in sample_row(dom, "short") and "has 2 pages, no page 3" in sample_row(dom, "short")
    assert "cannot open the PDF: it is truncated or damaged beyond repair" in sample_row(dom, "broken")
    assert "rows<b>6</b>" in dom and "errors<b>1</b>" in dom and "PDF pages<b>3</b>" in dom and "videos<b>1</b>" in dom


def test_an_answer_without_a_question_column_and_a_video_that_will_not_decode(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    rows = [{"id": "clip", "video": str(tmp_path / "noise.mp4"), "answer": "No idea."}]
    output = pass_output(tmp_path / "asked.parquet", rows, [("answer", pa.string())])
    page = Path(report.write_table_report(str(output)))
    row = sample_row(page.read_text(), "clip")
    assert "A: No idea." in text(row) and 'class="question"' not in row
    assert "image unavailable" in row and "noise.mp4" in row


def test_parsed_markdown_is_shown_as_preformatted_text_never_as_html(tmp_path, chromium):
    markdown = f"# Invoice\n\n| item | price |\n| --- | --- |\n| {INJECTED} | 3 |\n\n{SCRIPT}\n**total**\x00"
    rows = [{"id": f"page-{i}", "image_bytes": png((250, 250, 250), shift=i), "markdown": markdown} for i in range(2)]
    page = Path(report.write_table_report(str(pass_output(tmp_path / "parsed.parquet", rows,
                                                          [("markdown", pa.string())]))))  # fmt: skip
    dom = dump_dom(chromium, tmp_path, page)
    elements = Elements(dom)
    assert elements.named("script") == [] and elements.named("strong") == []
    assert len(elements.named("h1")) == 1  # the report's own title; the markdown's heading is text
    assert not [attrs for _, attrs in elements.tags if "onerror" in attrs]
    shown = ("# Invoice\n\n| item | price |\n| --- | --- |\n"
             "| &lt;img src=x onerror=\"document.title='pwned'\"&gt; | 3 |\n\n&lt;script&gt;alert(1)&lt;/script&gt;\n"
             "**total**\ufffd")
    assert dom.count(f'<pre class="markdown">{shown}</pre>') == 2
    assert "pwned" not in dom.split("</title>")[0]


def test_pdf_pages_are_refused_like_the_pass_refuses_them(tmp_path):
    pdf = str(two_page_pdf(tmp_path / "doc.pdf"))
    layout = report.ReportLayout(report.canonical_uri(str(tmp_path / "r.html")))
    few_pages = report.ThumbnailStore(layout, pdf_max_pages=1)
    refused = few_pages.for_uri(pdf, page=1)
    few_pages.make_pending()
    assert refused.thumb is None and "the PDF has 2 pages, over the limit of 1 (pdf_max_pages)" in refused.problem
    # Page 2 at 144 dpi is 400 x 800 px; the thumbnail is rendered small, but the page is refused as the pass would,
    # and with it the whole document (the pass makes it one error row).
    few_pixels = report.ThumbnailStore(layout, max_pixels=400 * 800 - 1)
    big, small = few_pixels.for_uri(pdf, page=2), few_pixels.for_uri(pdf, page=1, sized=True)
    few_pixels.make_pending()
    assert big.thumb is None and "page 2 is 400x800 = 320000 pixels at 144 dpi, over the limit" in big.problem
    assert small.thumb is None and big.problem == small.problem
    enough = report.ThumbnailStore(layout, max_pixels=400 * 800)
    page_one = enough.for_uri(pdf, page=1, sized=True)
    enough.make_pending()
    assert page_one.problem is None and page_one.size == (600, 400)


def test_a_mirrored_sideways_phone_video_gets_an_upright_thumbnail(tmp_path):
    from samples.media_files import write_video

    video = write_video(tmp_path / "phone.mp4", width=48, height=80, rotation=90, hflip=True, seconds=0.5)
    rows = [{"id": "phone", "video": str(video), "answer": "A red corner."}]
    page = Path(report.write_table_report(str(pass_output(tmp_path / "asked.parquet", rows, [("answer", pa.string())]))))
    thumb = thumbnail(page, sample_row(page.read_text(), "phone")).convert("RGB")
    assert thumb.size == (48, 80)  # upright: portrait, as the phone showed it
    assert near(thumb.getpixel((6, 10)), (255, 0, 0)) and not near(thumb.getpixel((42, 10)), (255, 0, 0))
