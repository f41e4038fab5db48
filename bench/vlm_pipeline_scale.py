"""The VLM pass's pipeline at 100k and 1M rows, with the model taken out: today's pass (Ray Data's write tasks and
checkpointing, no row through the driver) against the design it replaced (every row pulled into the driver by
`iter_batches`, written there as part files, merged into one OUTPUT.parquet, resume by a set of written ids).

The stand-in model (this file only) is the real VLMPredictor with `generate` replaced by a constant answer: the
decode stage, the actor's row and column handling and the output are the product's own; no tensor work.
Input: one Parquet file of N rows, `id` and `image_bytes` (one 32x32 PNG, 100-odd bytes, in every row: decoding is
real per row), row groups of 50k. Each design runs in a fresh subprocess with its own local Ray cluster
(`ray.init` untimed), so its driver's peak RSS is its own. Then each design's rerun over its fully written output:
seconds and driver peak RSS until it knows nothing is left.

Prediction, written before measuring. The old driver holds each batch it receives and its id set; its RSS should
grow with rows (the 1M-row id set alone ~100 MB, Ray's iterator buffers more) and its rows/s is bounded by one
driver process converting, writing and merging every row (plus the final merge re-reading everything). The new
driver only plans and waits: flat RSS (~the interpreter + Ray, a few hundred MB) whatever N; rows/s bounded by the
2 cores' decode and write tasks, so I expect new >= old by 1.2-2x at 1M (the old merge alone rereads all rows).
Rerun over 1M written rows: old ~40 s and >1 GB (issue 12 measured 41 s / 1.3 GB); new: Ray reads the 1M ids of its
checkpoint and filters every input row on workers, ~20-40 s with a flat driver.

Run from the repo root (about 15 minutes on 2 cores with the defaults):
    .venv/bin/python bench/vlm_pipeline_scale.py [--rows 100000,1000000] [--batch 256]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # Ray workers

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from ray_jobs.passes.analyze import VLMPredictor  # noqa: E402


class StandInPredictor(VLMPredictor):
    """VLMPredictor with the model taken out: a constant answer per row (defined here, so Ray ships it by value)."""

    def __init__(self, vlm_model, settings, task_args, schema, inbox=None):
        import types

        from engine.vlm.tasks import make_task

        self.vlm = types.SimpleNamespace(name="stand-in")
        self.task = make_task(settings=settings, **task_args)
        self.schema, self.inbox = schema, inbox

    def _answer(self, batch, asked, rows) -> None:
        for i in asked:
            rows[i].update(num_output_tokens=3, text="a constant answer")


def old_decode_batch(batch: pa.Table, settings, skip_ids: frozenset[str]) -> pa.Table:
    """The old decode stage: drop the ids already written (the whole set travels with every task), then decode."""
    import pyarrow.compute as pc

    from ray_jobs.passes.analyze import decode_batches

    if skip_ids:
        batch = batch.filter(pc.invert(pc.is_in(batch.column("id"), pa.array(list(skip_ids), pa.string()))))
    return pa.concat_tables(list(decode_batches(batch, settings)))


def old_pass(manifest: str, out: str, settings, schema: pa.Schema) -> None:
    """The design before: a single input file, ids to skip shipped to every decode task, every output row through
    the driver into part files, then one merged OUTPUT.parquet (ray_jobs/analyze.py at a13e3a9, minus metrics)."""
    import uuid

    import ray

    from engine import storage

    parts = f"{out}.parts"
    done = set()
    committed_parts = [f"{parts}/{n}" for n in sorted(os.listdir(parts))] if os.path.isdir(parts) else []
    for uri in ([out] if os.path.exists(out) else []) + committed_parts:
        done.update(pq.read_table(uri, columns=["id"]).column("id").to_pylist())
    ids = pq.read_table(manifest, columns=["id"]).column("id").to_pylist()
    if set(ids) <= done:
        return
    ds = ray.data.read_parquet(manifest).map_batches(
        old_decode_batch, fn_kwargs={"settings": settings, "skip_ids": frozenset(done)}, batch_format="pyarrow",
        ray_remote_args_fn=lambda: {"scheduling_strategy": "SPREAD"},
    )  # fmt: skip
    ds = ds.map_batches(
        StandInPredictor, batch_size=settings.vlm_batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"vlm_model": "stand-in", "settings": settings,
                               "task_args": {"name": "ocr"}, "schema": schema},
        compute=ray.data.ActorPoolStrategy(size=1), num_gpus=0,
    )  # fmt: skip
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if batch.num_rows:
            storage.write_parquet(f"{parts}/part-{uuid.uuid4().hex}.parquet", batch.select(schema.names).cast(schema))
    sources = ([out] if os.path.exists(out) else []) + [f"{parts}/{n}" for n in sorted(os.listdir(parts))]
    merged = f"{out}.merging"
    with pq.ParquetWriter(merged, schema) as writer:
        for uri in sources:
            for record_batch in pq.ParquetFile(uri).iter_batches():
                writer.write_table(pa.Table.from_batches([record_batch]).cast(schema))
    os.replace(merged, out)
    storage.remove(parts)


def child(design: str, manifest: str, out: str, batch: int) -> None:
    """One timed pass in this (fresh) process; prints seconds and the driver's peak RSS as JSON."""
    import logging
    import resource

    import ray

    import ray_jobs.passes.analyze as analyze_module
    from engine.settings import load_settings
    from engine.vlm.tasks import make_task
    from ray_jobs.passes.inputs import check_images_manifest

    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    settings = load_settings("tiny", overrides={"vlm_batch_size": batch, "vlm_rows_per_file": 100_000})
    began = time.perf_counter()
    if design == "new":
        analyze_module.VLMPredictor = StandInPredictor  # the pass looks its model stage up at call time
        request = analyze_module.AnalyzeRequest(input=manifest, task="ocr", out=out, settings=settings,
                                                show_progress=False)  # fmt: skip
        analyze_module.analyze(request)
    else:
        schema = analyze_module.output_schema(check_images_manifest(manifest).schema, make_task("ocr", settings))
        old_pass(manifest, out, settings, schema)
    seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def write_manifest(path: Path, rows: int) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 180, 40)).save(buffer, format="PNG")
    png = buffer.getvalue()
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("image_bytes", pa.binary())])) as writer:
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            ids = pa.array([f"row-{i:08}" for i in range(start, start + n)])
            writer.write_table(pa.table({"id": ids, "image_bytes": pa.array([png] * n, pa.binary())}))


def measure(design: str, manifest: Path, out: Path, batch: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", design, str(manifest), str(out), str(batch)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{design} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def count_rows(out: Path) -> int:
    return pq.read_table(out, columns=["id"]).num_rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--batch", type=int, default=256, help="vlm_batch_size (rows per model call)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dreamfleet-scale-") as tmp:
        for rows in (int(r) for r in args.rows.split(",")):
            manifest = Path(tmp) / f"in-{rows}.parquet"
            write_manifest(manifest, rows)
            results = {}
            for design in ("old", "new"):
                out = Path(tmp) / f"{design}-{rows}.parquet"
                first = measure(design, manifest, out, args.batch)
                assert count_rows(out) == rows, (design, count_rows(out))
                again = measure(design, manifest, out, args.batch)
                assert count_rows(out) == rows, (design, "rerun", count_rows(out))
                results[design] = first
                print(f"{rows:>9,} rows  {design}: {rows / first['seconds']:8.0f} rows/s ({first['seconds']:6.1f} s), "
                      f"driver peak RSS {first['peak_rss_mb']:6.0f} MB; rerun with nothing left "
                      f"{again['seconds']:5.1f} s, {again['peak_rss_mb']:6.0f} MB", flush=True)  # fmt: skip
            ratio = results["old"]["seconds"] / results["new"]["seconds"]
            memory = results["old"]["peak_rss_mb"] / results["new"]["peak_rss_mb"]
            print(f"{rows:>9,} rows  new/old rows/s: {ratio:.2f}x; old/new driver peak RSS: {memory:.2f}x", flush=True)


if __name__ == "__main__":
    main()
