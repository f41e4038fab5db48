"""Driver time and peak memory of the file-level checks of an images manifest (`ray_jobs.passes.inputs`) at 10 million
ids, against the check a user would write first: read every file's id column into one table and count values.

Input: --files Parquet files (default 100) of --ids ids in all (default 10,000,000), ids like `doc-000123-000456`
(17 characters), with a short `image` URI column, written once into a temporary folder (untimed).
Each check runs in a fresh subprocess (so each peak RSS is its own): ours streams the `id` and `image` columns in
batches of 64k rows, validates UTF-8, counts nulls and keeps one 64-bit hash per id; the naive one
`pyarrow.dataset(...).to_table(columns=["id", "image"])`, validates, then `pyarrow.compute.value_counts` on the ids.

Prediction, written before measuring: the naive check holds the id and image columns (~10M x (17 + ~30) bytes, plus
offsets ~0.55 GB) and a hash table of 10M entries (~0.3-0.5 GB), so ~1.2 GB above the interpreter, and takes ~10 s;
ours holds 80 MB of hashes plus a sort's copy (~160 MB) and takes ~15-25 s (each id becomes a Python string for
pandas' hash, ~1 us per id on a slow core).

Run from the repo root (a few minutes on 2 cores, most of it writing the input):
    .venv/bin/python bench/images_input_checks.py [--ids 10000000] [--files 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OURS = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from ray_jobs.passes.inputs import check_images_manifest
began = time.perf_counter()
rows = check_images_manifest({folder!r}).num_rows
print(json.dumps({{"rows": rows, "seconds": time.perf_counter() - began,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

NAIVE = """
import json, resource, time
import pyarrow.compute as pc, pyarrow.dataset as pds
began = time.perf_counter()
table = pds.dataset({folder!r}, format="parquet").to_table(columns=["id", "image"])
for name in ("id", "image"):
    table.column(name).validate(full=True)
assert table.column("id").null_count == 0
counts = pc.value_counts(table.column("id"))
assert pc.max(counts.field("counts")).as_py() == 1
print(json.dumps({{"rows": table.num_rows, "seconds": time.perf_counter() - began,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

BASELINE = """
import json, resource
import pyarrow.compute, pyarrow.dataset, pandas, numpy, sys
sys.path.insert(0, {repo!r})
import ray_jobs.passes.inputs
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def write_input(folder: Path, ids: int, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    per_file = ids // files
    for k in range(files):
        names = [f"doc-{k:06}-{i:06}" for i in range(per_file)]
        images = [f"s3://bucket/scans/{k:06}/{i:06}.jpg" for i in range(per_file)]
        pq.write_table(pa.table({"id": names, "image": images}), folder / f"part-{k:05}.parquet")


def run(script: str, **values) -> dict:
    result = subprocess.run([sys.executable, "-c", script.format(repo=str(REPO), **values)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dreamfleet-ids-") as tmp:
        folder = Path(tmp)
        began = time.perf_counter()
        write_input(folder, args.ids, args.files)
        print(f"input: {args.ids:,} ids in {args.files} files, written in {time.perf_counter() - began:.1f} s")
        base = run(BASELINE)["peak_rss_mb"]
        print(f"interpreter with the imports: {base:.0f} MB")
        for name, script in (("dreamfleet (streamed, hashed)", OURS), ("naive (whole columns, value_counts)", NAIVE)):
            result = run(script, folder=str(folder))
            print(f"{name:38} {result['seconds']:6.1f} s  peak RSS {result['peak_rss_mb']:6.0f} MB "
                  f"(+{result['peak_rss_mb'] - base:.0f} MB)  rows {result['rows']:,}")  # fmt: skip


if __name__ == "__main__":
    main()
