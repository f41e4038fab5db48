"""`dreamfleet run --set vlm_engine=vllm` in the vLLM rig (make test-vllm): the run's own moderation pass on vLLM,
its verdicts deciding what is withheld, as on the transformers engine."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_jobs.cli import main
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory
from tests.helpers.subjects import make_subject_rows

pytestmark = pytest.mark.vllm

TINY = ["--set", "max_train_steps=4", "--set", "checkpointing_steps=4", "--set", "num_class_images=2",
        "--set", "num_images_per_prompt=2", "--no-progress"]  # fmt: skip
VLLM = ["--set", "vlm_engine=vllm", "--set", "vlm_engine_args={enforce_eager: true}"]


def test_run_moderates_on_vllm_and_withholds_from_its_verdicts(vllm_cluster, tmp_path, capsys):
    rows = make_subject_rows(tmp_path / "images", 2)
    for row in rows:
        row["prompts"] = ["a photo of sks thing on a table"]
    manifest, run = str(tmp_path / "subjects.parquet"), tmp_path / "run"
    write_subjects_manifest(manifest, rows)

    # moderation_threshold 0: whatever score vLLM gives, every image is unsafe, so withholding shows the verdicts
    # reached the run (the scores themselves equal the transformers engine's: tests/engine/vlm/test_vllm_engine.py).
    args = ["run", manifest, "--out", str(run), *TINY, *VLLM, "--set", "moderation_threshold=0"]
    assert main(args) == 0
    assert RunDirectory(str(run)).read_run()["settings"]["vlm_engine"] == "vllm"
    generations = pq.read_table(run / "generations.parquet").to_pylist()
    verdicts = pq.read_table(run / "moderation.parquet").to_pylist()
    assert len(generations) == 2 * 2 and sorted(r["id"] for r in verdicts) == sorted(r["id"] for r in generations)
    assert all(r["error"] is None and 0.0 <= r["score"] <= 1.0 and r["num_output_tokens"] > 0 for r in verdicts)
    assert all(r["withheld"] and Path(r["image"]).is_file() for r in generations)
    assert {s.state for s in RunDirectory(str(run)).read_statuses().values()} == {"done"}

    parts = {p: p.stat().st_mtime_ns for p in (run / "moderation.parquet").rglob("*.parquet")}
    assert main(args) == 0  # the same command again: nothing moderated twice
    assert {p: p.stat().st_mtime_ns for p in (run / "moderation.parquet").rglob("*.parquet")} == parts
