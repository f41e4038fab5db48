"""Which generated images are withheld from the delivered set: those the moderation pass marked unsafe.

A withheld image keeps its file and its row (`image` says where it is); `withheld` true keeps it out of the delivered
listing and the report's gallery. Nothing is deleted, so a later decision (another `moderation_threshold`) can
deliver it again.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from engine import storage
from engine.settings import Settings

WITHHELD = pa.field("withheld", pa.bool_())


def is_unsafe(safe: bool | None, score: float | None, error: str | None, threshold: float | None) -> bool:
    """A moderation row's verdict: the model's `safe`, or `score >= threshold` when a threshold is set. A row that
    failed (no verdict) is not called unsafe: its error is reported by the pass, and the report shows it."""
    if error is not None:
        return False
    if threshold is not None:
        return score is not None and score >= threshold
    return safe is False


def moderation_rows(moderation_uri: str) -> list[dict[str, Any]]:
    """The verdict columns of a moderation pass output (a folder of part files); none when there is no output yet."""
    fs, path = storage.filesystem(moderation_uri)
    if not fs.isdir(path):
        return []
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    if not files:
        return []
    dataset = pds.dataset(files, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)), format="parquet")
    return dataset.to_table(columns=["id", "safe", "score", "error"]).to_pylist()


def withheld_ids(moderation_uri: str, settings: Settings) -> set[str]:
    """Ids of the images to withhold under `settings` (none when `withhold_unsafe` is off)."""
    if not settings.withhold_unsafe:
        return set()
    return {
        row["id"]
        for row in moderation_rows(moderation_uri)
        if is_unsafe(row["safe"], row["score"], row["error"], settings.moderation_threshold)
    }


def with_withheld(table: pa.Table, withheld: set[str]) -> pa.Table:
    """`table` (rows with an `id`) with its `withheld` column set from `withheld`, replacing any it had."""
    if WITHHELD.name in table.column_names:
        table = table.drop_columns([WITHHELD.name])
    flags = [row_id in withheld for row_id in table.column("id").to_pylist()]
    return table.append_column(WITHHELD, pa.array(flags, WITHHELD.type))


def delivered(table: pa.Table) -> pa.Table:
    """The rows of a generations table that are delivered: every row not withheld."""
    if WITHHELD.name not in table.column_names:
        return table
    return table.filter(pc.invert(table.column(WITHHELD.name)))


def count_withheld(generations_uri: str) -> int:
    """Withheld rows of RUN/generations.parquet (0 when it is absent or predates the column)."""
    import pyarrow.parquet as pq

    if not storage.exists(generations_uri):
        return 0
    table = pq.read_table(pa.BufferReader(storage.read_bytes(generations_uri)))
    if WITHHELD.name not in table.column_names:
        return 0
    return sum(bool(v) for v in table.column(WITHHELD.name).to_pylist())
