"""`dreamfleet run` on a FLUX base (`tiny-flux`) through the fleet on a local Ray cluster: a FLUX run is a run."""

from __future__ import annotations

import json
from pathlib import Path

from ray_jobs.cli import main
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory
from tests.helpers.subjects import make_subject_rows


def test_run_on_tiny_flux_trains_generates_and_moderates_every_subject(ray_cluster, tmp_path):
    import pyarrow.parquet as pq
    from diffusers import FluxPipeline

    rows = make_subject_rows(tmp_path / "images", 2)
    for row in rows:
        row["prompts"] = ["a photo of sks thing at the beach"]
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)

    # One worker: both subjects train in one pack on the transformer and render in shared batches.
    code = main(["run", manifest, "--out", run, "--base-model", "tiny-flux", "--workers", "1", "--no-progress",
                 "--set", "max_train_steps=6", "--set", "checkpointing_steps=3", "--set", "num_class_images=2",
                 "--set", "num_images_per_prompt=2", "--set", "num_inference_steps=4", "--set", "evaluate=false"])  # fmt: skip

    assert code == 0
    assert {s.state for s in RunDirectory(run).read_statuses().values()} == {"done"}
    record = json.loads((Path(run) / "run.json").read_text())
    assert record["base_model"] == "tiny-flux" and "tiny-flux" in record["base_model_path"]
    table = pq.read_table(Path(run) / "generations.parquet").to_pylist()
    assert sorted((r["subject_id"], r["image_index"]) for r in table) == [("s0", 0), ("s0", 1), ("s1", 0), ("s1", 1)]
    assert all(Path(r["image"]).is_file() for r in table) and {r["scheduler"] for r in table} == {"flow_match_euler"}
    assert pq.read_table(Path(run) / "moderation.parquet").num_rows == len(table)

    pipe = FluxPipeline.from_pretrained(record["base_model_path"])
    pipe.load_lora_weights(str(Path(run) / "subjects" / "s0" / "weights"))  # stock FLUX takes the fleet's weights
    assert set(pipe.get_list_adapters()) == {"transformer"}
