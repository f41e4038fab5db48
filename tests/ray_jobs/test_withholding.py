"""`dreamfleet run` withholds what its moderation pass marks unsafe: through the real pass and the tiny VLM, with
`moderation_threshold` forcing the verdicts (0: every image unsafe; 1.01: none)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from engine.settings import load_settings
from ray_jobs.cli import main
from ray_jobs.metrics import RunMetrics
from ray_jobs.run import FleetRequest, run_manifest
from ray_jobs.state.manifest import write_subjects_manifest
from tests.helpers.subjects import make_subject_rows

TINY = {"max_train_steps": 4, "checkpointing_steps": 4, "num_class_images": 2, "num_images_per_prompt": 2,
        "evaluate": False}  # fmt: skip


def test_unsafe_images_are_withheld_kept_counted_and_hidden_until_asked(ray_cluster, tmp_path, capsys):
    rows = make_subject_rows(tmp_path / "images", 1)
    rows[0]["prompts"] = ["a photo of sks ball on a table"]
    manifest, run = str(tmp_path / "subjects.parquet"), tmp_path / "run"
    write_subjects_manifest(manifest, rows)
    metrics = RunMetrics()
    assert metrics.registry.get_sample_value("dreamfleet_images_withheld") == 0  # zero from the start
    request = FleetRequest(manifest=manifest, out=str(run), show_progress=False, metrics=metrics,
                           settings=load_settings("tiny", overrides={**TINY, "moderation_threshold": 0}))  # fmt: skip
    code, _ = run_manifest(request, ("train", "generate", "moderate", "evaluate"))
    assert code == 0  # withholding is not a failure

    table = pq.read_table(run / "generations.parquet").to_pylist()
    assert len(table) == 2 and all(r["withheld"] for r in table)
    assert all(Path(r["image"]).is_file() for r in table)  # kept, never deleted
    verdicts = pq.read_table(run / "moderation.parquet")
    assert "withheld" not in verdicts.column_names and verdicts.column("error").null_count == 2
    assert metrics.registry.get_sample_value("dreamfleet_images_withheld") == 2
    assert "withheld: 2 generated image(s)" in capsys.readouterr().out

    assert main(["status", str(run)]) == 0
    assert "images withheld (marked unsafe by moderation, kept in RUN): 2" in capsys.readouterr().out
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert ">withheld<b>2</b>" in html and "seed " not in html  # counted, no gallery image
    assert main(["report", str(run), "--show-withheld"]) == 0
    html = (run / "report.html").read_text()
    assert html.count('class="verdict withheld"') == 2

    # Another threshold on the same RUN decides again from the verdicts already written: nothing is retrained,
    # re-rendered or moderated twice, and every image is delivered.
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.suffix in (".png", ".safetensors")}
    parts = sorted((run / "moderation.parquet").rglob("*.parquet"))
    settings = [flag for k, v in TINY.items() for flag in ("--set", f"{k}={v}")]
    args = ["run", manifest, "--out", str(run), "--no-progress", *settings, "--set", "moderation_threshold=1.01"]
    assert main(args) == 2  # other settings: refused without --extend
    assert main([*args, "--extend"]) == 0
    assert not any(r["withheld"] for r in pq.read_table(run / "generations.parquet").to_pylist())
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sorted((run / "moderation.parquet").rglob("*.parquet")) == parts
    assert all(os.path.getsize(p) for p in parts)
