"""Curation before training through the CLI on a local cluster and the real tiny VLM: every instance photo is
answered by the detect and moderate passes, refused photos are named, a subject left with too few fails alone, the
others train on their kept (cropped) photos, and a rerun redoes nothing. `moderation_threshold` forces the screening
verdicts (1.01: nothing flagged; 0: everything)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from ray_jobs.cli import main
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory
from tests.helpers.subjects import make_subject_rows

TINY = ["--set", "max_train_steps=2", "--set", "checkpointing_steps=2", "--set", "num_class_images=2",
        "--set", "curate=true", "--no-progress"]  # fmt: skip


def test_curation_refuses_names_crops_and_fails_only_the_subject_left_short(ray_cluster, tmp_path, capsys):
    rows = make_subject_rows(tmp_path / "images", 2)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"not an image at all")
    for row in rows:
        row["instance_images"] = [*row["instance_images"], str(broken)]
    rows[1]["params"] = '{"min_instance_images": 4}'  # 3 usable photos are too few for it
    manifest, run = str(tmp_path / "subjects.parquet"), tmp_path / "run"
    write_subjects_manifest(manifest, rows)
    args = ["train", manifest, "--out", str(run), *TINY, "--set", "moderation_threshold=1.01"]

    assert main(args) == 1  # s1 failed; s0 trained without the broken photo
    assert "curation: 1 subject(s) left with too few usable photos: s1" in capsys.readouterr().out
    statuses = RunDirectory(str(run)).read_statuses()
    assert statuses["s0"].state == "trained" and statuses["s1"].state == "failed"
    assert "curation left 3 usable photo(s) of 4, fewer than min_instance_images (4)" in statuses["s1"].error
    assert f"{broken}: unusable:" in statuses["s1"].error

    table = pq.read_table(run / "curation.parquet")
    assert table.schema.names == ["subject_id", "image", "kept", "reason", "box", "caption", "categories"]
    verdicts = table.to_pylist()
    assert len(verdicts) == 8 and [v["kept"] for v in verdicts] == [True, True, True, False] * 2
    assert all(v["reason"].startswith("unusable: ") for v in verdicts if v["image"] == str(broken))
    for k, verdict in enumerate(verdicts[:3]):  # the tiny VLM's boxes decide which are cropped; each crop is square
        crop = run / "subjects" / "s0" / "curated" / f"{k}.png"
        assert crop.is_file() == (verdict["box"] is not None)
        if verdict["box"] is not None:
            assert verdict["reason"] == "one ball found: cropped around it"
            width, height = Image.open(crop).size
            assert width == height <= min(Image.open(verdict["image"]).size)

    # The report shows every photo's verdict, and the box a kept photo was cropped around.
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert html.count('class="curation safe"') == 6 and html.count('class="curation error"') == 2
    assert html.count("refused: unusable:") == 2
    assert html.count('<g class="box">') == sum(v["box"] is not None for v in verdicts)

    # The same command again: no photo answered twice, no crop rewritten, the same verdicts.
    answers = [p for p in (run / "curation").rglob("*.parquet") if p.is_file() and not p.name.startswith("photos")]
    stamps = {p: p.stat().st_mtime_ns for p in [*answers, *run.rglob("curated/*.png")]}
    assert len(answers) >= 2
    assert main(args) == 1
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert pq.read_table(run / "curation.parquet").to_pylist() == verdicts

    # Everything flagged: no subject has a usable photo, each fails naming its photos, nothing trains.
    flagged = tmp_path / "flagged"
    assert main(["train", manifest, "--out", str(flagged), *TINY, "--set", "moderation_threshold=0"]) == 1
    statuses = RunDirectory(str(flagged)).read_statuses()
    assert {s.state for s in statuses.values()} == {"failed"}
    assert statuses["s0"].error.count("flagged by moderation") == 3 and "unusable" in statuses["s0"].error
    assert not list(Path(flagged).rglob("*.safetensors"))
