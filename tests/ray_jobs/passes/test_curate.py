"""Curation before training through the CLI on a local cluster and the real tiny VLM: every instance photo is
answered by the detect, moderate and (caption mode) caption passes, refused photos are named, a subject left with too
few fails alone, the others train on their kept (cropped) photos with their captions, and a rerun redoes nothing.
`moderation_threshold` forces the screening verdicts (1.01: nothing flagged; 0: everything)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from engine.diffusion.checkpoints import load_latest_checkpoint
from ray_jobs.cli import main
from ray_jobs.state.curation import photo_prompt
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
    # Photos where grounding finds no ball/box or several are refused; each photo trains with its caption.
    args = ["train", manifest, "--out", str(run), *TINY, "--set", "moderation_threshold=1.01",
            "--set", "curate_unlocated=refuse", "--set", "instance_prompt_mode=caption"]  # fmt: skip

    assert main(args) == 1  # s1 failed; s0 trained without the broken photo
    assert "curation: 1 subject(s) left with too few usable photos: s1" in capsys.readouterr().out
    statuses = RunDirectory(str(run)).read_statuses()
    assert statuses["s0"].state == "trained" and statuses["s1"].state == "failed"
    assert "curation left 2 usable photo(s) of 4, fewer than min_instance_images (4)" in statuses["s1"].error
    assert f"{broken}: unusable:" in statuses["s1"].error

    table = pq.read_table(run / "curation.parquet")
    assert table.schema.names == ["subject_id", "image", "kept", "reason", "box", "caption", "categories"]
    verdicts = table.to_pylist()
    assert len(verdicts) == 8 and [v["kept"] for v in verdicts] == [True, True, True, False, True, False, True, False]
    assert all(v["reason"].startswith("unusable: ") for v in verdicts if v["image"] == str(broken))
    # A photo is kept only with one instance found. The random tiny VLM's greedy answer finds two boxes in s1's
    # second photo (and one shape in each other photo): refused, named in s1's error, counted against its minimum.
    assert all(v["kept"] == v["reason"].startswith("one ") for v in verdicts if v["image"] != str(broken))
    assert verdicts[5]["reason"] == "2 boxes found: refused (curate_unlocated: refuse)"
    assert f"{rows[1]['instance_images'][1]}: 2 boxes found: refused" in statuses["s1"].error
    # Every readable photo has its caption; s0 trained on its kept photos, each with its own caption after the
    # instance prompt (the prompts its checkpoint records, and hashes into the identity a resume must match).
    assert all(isinstance(v["caption"], str) == (v["image"] != str(broken)) for v in verdicts)
    trained = load_latest_checkpoint(str(run / "subjects" / "s0" / "checkpoints"))
    expected = [photo_prompt("a photo of sks ball", v["caption"]) for v in verdicts[:3]]
    assert trained.extra["instance_prompts"] == expected
    assert all(p.startswith("a photo of sks ball, ") for p in trained.extra["instance_prompts"])
    for k, verdict in enumerate(verdicts[:3]):  # the tiny VLM's boxes decide which are cropped; each crop is square
        crop = run / "subjects" / "s0" / "curated" / f"{k}.png"
        assert crop.is_file() == (verdict["box"] is not None)
        if verdict["box"] is not None:
            assert verdict["reason"] == "one ball found: cropped around it"
            width, height = Image.open(crop).size
            assert width == height <= min(Image.open(verdict["image"]).size)

    # The report shows every photo's verdict, the box a kept photo was cropped around, and its caption.
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert html.count('class="curation safe"') == 5 and html.count('class="curation error"') == 3
    assert html.count("refused: unusable:") == 2
    assert html.count('<g class="box">') == sum(v["box"] is not None for v in verdicts)
    assert html.count('<q class="caption">') == sum(bool(v["caption"]) for v in verdicts) > 0

    # The same command again: no photo answered twice, no crop rewritten, the same verdicts.
    answers = [p for p in (run / "curation").rglob("*.parquet") if p.is_file() and not p.name.startswith("photos")]
    stamps = {p: p.stat().st_mtime_ns for p in [*answers, *run.rglob("curated/*.png")]}
    assert {"detect.parquet", "moderation.parquet", "caption.parquet"} <= {p.parent.name for p in answers}
    assert main(args) == 1
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert pq.read_table(run / "curation.parquet").to_pylist() == verdicts

    # Everything flagged: no subject has a usable photo, each fails naming its photos, nothing trains. Fixed prompts
    # (the default): no caption pass, no captions.
    flagged = tmp_path / "flagged"
    assert main(["train", manifest, "--out", str(flagged), *TINY, "--set", "moderation_threshold=0"]) == 1
    statuses = RunDirectory(str(flagged)).read_statuses()
    assert {s.state for s in statuses.values()} == {"failed"}
    assert statuses["s0"].error.count("flagged by moderation") == 3 and "unusable" in statuses["s0"].error
    assert not list(Path(flagged).rglob("*.safetensors"))
    assert not (flagged / "curation" / "caption.parquet").exists()
    assert {v["caption"] for v in pq.read_table(flagged / "curation.parquet").to_pylist()} == {None}
