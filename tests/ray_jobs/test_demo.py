"""`dreamfleet demo` end to end on a local cluster: it curates (one thumbnail refused, with its reason), trains on
`tiny-prior`, renders, moderates, scores, retrains the subject its relative gate catches, runs the document tasks
and writes the report; its console says what curation refused and what the gate did."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from ray_jobs.cli import main
from ray_jobs.state.run_dir import RunDirectory


def test_the_demo_shows_curation_refusing_a_photo_and_the_gate_retrying_a_subject(ray_cluster, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    console = capsys.readouterr().out
    run = RunDirectory(str(out / "run"))

    refused = [r for r in pq.read_table(run.curation).to_pylist() if not r["kept"]]
    assert [Path(r["image"]).name for r in refused] == ["thumbnail.png"]
    assert "min_image_side" in refused[0]["reason"] or "small" in refused[0]["reason"], refused
    assert f"curation refused {refused[0]['image']} (ball-blue): {refused[0]['reason']}" in console

    statuses = run.read_statuses()
    gated = {sid: s for sid, s in statuses.items() if s.gate}
    assert list(gated) == ["ring-green"], {sid: s.evaluation for sid, s in statuses.items()}  # its photos disagree
    record = gated["ring-green"].gate
    assert [a["params"] for a in record["attempts"]] == [{}, {"max_train_steps": 150}]  # DINO low: more steps
    assert "quality gate retried ring-green" in console
    assert all(s.state in ("done", "below_gate") for s in statuses.values()), statuses
    assert (out / "run/report.html").exists() and (out / "documents-extract.parquet").exists()
