"""`dreamfleet evaluate RUN` on the local Ray cluster, over run directories built by hand: every generated image
scored once, each subject's means in its status, resumed without rescoring, bad rows and missing models named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageOps

from engine.settings import load_settings
from ray_jobs.cli import main
from ray_jobs.state.generations import SCHEMA as GENERATIONS_SCHEMA
from ray_jobs.state.manifest import read_subjects_manifest, write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory, SubjectStatus
from tests.helpers.subjects import draw_subject


def _phone_photo(path: Path) -> Path:
    """A 12-megapixel JPEG of several MB stored sideways with EXIF orientation 6, as phones write portraits."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 60, (3024, 4032, 3), dtype=np.uint8)  # sensor noise keeps the file phone-sized
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).rectangle((0, 0, 1300, 3024), fill=(250, 240, 230))  # the top third, once upright
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(path, format="JPEG", quality=92, exif=exif)
    return path


def _build_run(root: Path) -> tuple[str, dict[str, dict]]:
    """A finished run directory, as `dreamfleet run` leaves one, with generated images chosen so the scores'
    order is known: copies of a subject's own photo, an unrelated image, a sideways phone photo."""
    (root / "photos").mkdir(parents=True)
    ball = [str(draw_subject(root / "photos" / f"ball-{k}.png", shift=k)) for k in range(3)]
    phone = _phone_photo(root / "photos" / "phone.jpg")
    rows = [
        {"subject_id": "ball", "instance_images": ball, "instance_prompt": "a photo of sks ball",
         "class_prompt": "a photo of a ball"},
        {"subject_id": "phone", "instance_images": [str(phone)], "instance_prompt": "a photo of sks box",
         "class_prompt": "a photo of a box"},
    ]  # fmt: skip
    manifest, run_uri = str(root / "subjects.parquet"), str(root / "run")
    write_subjects_manifest(manifest, rows)
    settings = load_settings("tiny")
    run = RunDirectory(run_uri)
    run.start(command="run", manifest_uri=manifest, settings=settings, base_model="tiny", base_model_path="tiny",
              manifest_fingerprint=read_subjects_manifest(manifest, settings).fingerprint, extend=False)  # fmt: skip
    upright = ImageOps.exif_transpose(Image.open(phone)).convert("RGB")
    images = {
        "ball/p0000-i0000": ("ball", "a photo of sks ball on the beach", Image.open(ball[1])),
        "ball/p0000-i0001": ("ball", "a photo of sks ball on the beach", Image.new("RGB", (32, 32), (0, 0, 0))),
        "ball/p0001-i0000": ("ball", "a photo of a ball", Image.open(ball[0])),
        "phone/p0000-i0000": ("phone", "a photo of sks box", upright.resize((24, 32))),
        "phone/p0000-i0001": ("phone", "a photo of sks box", upright.transpose(Image.Transpose.ROTATE_90).resize((32, 24))),
        "phone/p0001-i0000": ("phone", "a photo of sks box at night", None),  # its file is missing
    }  # fmt: skip
    table = []
    for rid, (sid, prompt, image) in images.items():
        path = Path(run_uri) / "subjects" / sid / "images" / f"{rid.split('/')[1]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if image is not None:
            image.convert("RGB").save(path)
        table.append({"id": rid, "subject_id": sid, "prompt": prompt, "prompt_index": int(rid[-10:-6]),
                      "image_index": int(rid[-4:]), "seed": 0, "image": str(path), "guidance_scale": 7.5,
                      "num_inference_steps": 10, "scheduler": "ddim"})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(table, schema=GENERATIONS_SCHEMA), Path(run_uri) / "generations.parquet")
    for sid in ("ball", "phone"):
        run.write_status(SubjectStatus(sid, state="done", attempts=2))
    return run_uri, {r["id"]: r for r in table}


def _scores(run: str) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(Path(run) / "evaluation.parquet").to_pylist()}


def _status(run: str, sid: str) -> dict:
    return json.loads((Path(run) / "subjects" / sid / "status.json").read_text())


def _part_files(run: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (Path(run) / "evaluation.parquet").rglob("*.parquet")}


@pytest.fixture(scope="module")
def evaluated(ray_cluster, tmp_path_factory) -> tuple[str, dict[str, dict]]:
    """A hand-built run, evaluated once by `dreamfleet evaluate`; tests that change it work on a copy."""
    run, generations = _build_run(tmp_path_factory.mktemp("evaluated"))
    assert main(["evaluate", run, "--no-progress"]) == 1  # one generated image is missing; all else is scored
    return run, generations


def test_every_generated_image_is_scored_once_and_each_subject_gets_its_means(evaluated, capsys):
    run, generations = evaluated
    scores = _scores(run)
    assert scores.keys() == generations.keys()
    missing = scores.pop("phone/p0001-i0000")
    assert "no such file" in missing["error"] and generations["phone/p0001-i0000"]["image"] in missing["error"]
    assert missing["dino"] is None and missing["clip_t"] is None
    assert all(r["error"] is None and -1 <= r["dino"] <= 1 and -1 <= r["clip_t"] <= 1 for r in scores.values())
    assert {r["dino_model"] for r in scores.values()} == {"tiny"}

    # A copy of one of the ball's photos scores above a black square; the phone photo is compared upright.
    assert scores["ball/p0000-i0000"]["dino"] > scores["ball/p0000-i0001"]["dino"]
    assert scores["ball/p0000-i0000"]["clip_i"] > scores["ball/p0000-i0001"]["clip_i"]
    assert scores["phone/p0000-i0000"]["dino"] > 0.999 > 0.99 > scores["phone/p0000-i0001"]["dino"]
    assert [sid for sid, r in scores.items() if r["class_prompt"]] == ["ball/p0001-i0000"]

    ball = _status(run, "ball")["evaluation"]
    fidelity = [scores[i] for i in ("ball/p0000-i0000", "ball/p0000-i0001")]
    assert ball["dino"] == pytest.approx(np.mean([r["dino"] for r in fidelity]))
    assert ball["clip_t"] == pytest.approx(np.mean([r["clip_t"] for r in fidelity]))
    assert ball["pres"] == pytest.approx(scores["ball/p0001-i0000"]["dino"]) and ball["class_images"] == 1
    assert (ball["images"], ball["errors"]) == (3, 0)
    phone = _status(run, "phone")
    assert phone["evaluation"]["errors"] == 1 and phone["evaluation"]["pres"] is None
    assert phone["state"] == "done" and phone["attempts"] == 2  # the rest of the status is untouched

    capsys.readouterr()
    assert main(["status", run]) == 0
    shown = capsys.readouterr().out
    worst = shown[shown.index("lowest DINO"):]
    assert worst.index("ball") < worst.index("phone")  # the black square pulls the ball's mean below the phone's
    assert ball["dino"] < phone["evaluation"]["dino"]


def test_a_rerun_scores_only_new_images(evaluated, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(evaluated[0], run, symlinks=True)
    generations = {r["id"]: r for r in pq.read_table(Path(run) / "generations.parquet").to_pylist()}
    files = _part_files(run)
    statuses = {p: p.stat().st_mtime_ns for p in (Path(run) / "subjects").glob("*/status.json")}
    assert main(["evaluate", run, "--no-progress"]) == 1  # nothing left to score: no cluster needed
    assert _part_files(run) == files
    assert {p: p.stat().st_mtime_ns for p in statuses} == statuses  # and no status rewritten with the same means
    added = {**generations["ball/p0000-i0000"], "id": "ball/p0000-i0002", "image_index": 2}
    table = pa.Table.from_pylist([*generations.values(), added], schema=GENERATIONS_SCHEMA)
    pq.write_table(table, Path(run) / "generations.parquet")
    assert main(["evaluate", run, "--no-progress"]) == 1
    after = _part_files(run)
    assert {f: after[f] for f in files} == files and len(after) == len(files) + 1
    again = _scores(run)
    assert len(again) == len(generations) + 1
    assert again["ball/p0000-i0002"]["dino"] == pytest.approx(again["ball/p0000-i0000"]["dino"], abs=1e-6)
    assert _status(run, "ball")["evaluation"]["images"] == 4


def test_other_models_rescore_every_image_and_a_model_not_at_hand_stops_first(evaluated, tmp_path, capsys,
                                                                             model_cache):  # fmt: skip
    run = str(tmp_path / "run")
    shutil.copytree(evaluated[0], run, symlinks=True)
    files = _part_files(run)
    capsys.readouterr()
    assert main(["evaluate", run, "--no-progress", "--eval-clip-model", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model: no such directory" in capsys.readouterr().err
    assert _part_files(run) == files

    own = tmp_path / "my-dino"  # a local folder, as a user's own checkpoint would be
    shutil.copytree(next(model_cache.glob("tiny-dino-*")), own)
    assert main(["evaluate", run, "--no-progress", "--eval-dino-model", str(own)]) == 1
    assert "scoring every image again" in capsys.readouterr().err
    scores = _scores(run)
    assert len(scores) == len(evaluated[1]) and {r["dino_model"] for r in scores.values()} == {str(own)}
    assert _status(run, "ball")["evaluation"]["dino_model"] == str(own)
