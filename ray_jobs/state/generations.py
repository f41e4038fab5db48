"""`generations.parquet`: each subject's rows written by its worker, and the run's table assembled from them.

A subject's file is written whole, once its images all exist; the run's file is rebuilt from the subjects' files
at the end of every invocation. So a retried subject or a rerun can never duplicate a row or leave a partial one.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.diffusion.generation import ROW_SCHEMA as SCHEMA
from ray_jobs.state.run_dir import GENERATIONS, RunDirectory, subject_dir
from ray_jobs.state.states import DONE


def write_subject_generations(folder: str, rows: list[dict[str, Any]]) -> None:
    storage.write_parquet(storage.join(folder, GENERATIONS), pa.Table.from_pylist(rows, schema=SCHEMA))


def assemble_generations(run: RunDirectory, passthrough: dict[str, dict[str, Any]]) -> int:
    """Rebuild RUN/generations.parquet from every done subject's rows, plus the manifest's extra columns."""
    tables = []
    for sid, status in sorted(run.read_statuses().items()):
        uri = storage.join(subject_dir(run.uri, sid), GENERATIONS)
        if status.state == DONE and storage.exists(uri):
            tables.append(pq.read_table(pa.BufferReader(storage.read_bytes(uri))))
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    extra_columns = sorted({c for values in passthrough.values() for c in values} - set(SCHEMA.names))
    ids = table.column("subject_id").to_pylist()
    for column in extra_columns:
        table = table.append_column(column, pa.array([passthrough.get(i, {}).get(column) for i in ids]))
    storage.write_parquet(run.generations, table)
    return table.num_rows
