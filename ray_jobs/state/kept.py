"""The quality gate's kept attempt put in place: when a retrain (RUN/gate/attempt-<k>/) beats a subject's first
attempt, RUN/subjects/<id> and RUN's tables are made to hold the retrain's results, and the first attempt's move to
RUN/gate/attempt-0/subjects/<id>/. Nothing is deleted: the retrain stays whole in its own run directory too.

Crash-safe by order and idempotence, with status.json as the commit point. First the first attempt is archived,
its status.json written last (so a half archive is redone, and a whole one is never overwritten by what followed);
then every step of the install copies from the retrain, each file atomically, and rewrites the subject's rows of
RUN's pass outputs in place by id (so the same ids stay committed in Ray Data's checkpoints, once each); last the
gate's record says `installed`. A kill anywhere before that leaves `installed` unset, and the rerun redoes the
install from the start, which gives the same bytes whatever was done before.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import storage
from engine.diffusion.subject import CHECKPOINTS, IMAGES, TRAIN_LOG, WEIGHTS
from ray_jobs.state.run_dir import EVALUATION, GATE, GENERATIONS, MODERATION, STATUS, RunDirectory, subject_dir

# What one training of a subject leaves in its folder; status.json and curated/ (the curated photos) stay put.
ATTEMPT_FILES = (WEIGHTS, IMAGES, CHECKPOINTS, TRAIN_LOG)
PASS_TABLES = (MODERATION, EVALUATION)  # RUN's pass outputs with a row per generated image


def archive_dir(run_uri: str, subject_id: str) -> str:
    """Where a subject's first attempt goes once a retrain replaces it."""
    return subject_dir(storage.join(run_uri, GATE, "attempt-0"), subject_id)


def _read(uri: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)))


def _parts(folder: str) -> list[str]:
    """The part files of a pass output (a folder), as URIs."""
    return [storage.join(folder, name) for name in storage.find(folder) if name.endswith(".parquet")]


def _of_subject(table: pa.Table, subject_id: str) -> pa.Array:
    return pc.starts_with(table.column("id"), f"{subject_id}/")  # ids are "<subject_id>/<image stem>"


def subject_rows(folder: str, subject_id: str) -> pa.Table | None:
    """A subject's rows of a pass output; None when the output has no part file."""
    tables = [t.filter(_of_subject(t, subject_id)) for t in map(_read, _parts(folder))]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _moved(table: pa.Table, old: str, new: str) -> pa.Table:
    """`table` with every path under the folder `old` (its `image` column) naming the same file under `new`."""
    if "image" not in table.column_names:
        return table
    images = [new + p[len(old) :] if p is not None and p.startswith(old + "/") else p
              for p in table.column("image").to_pylist()]  # fmt: skip
    return table.set_column(table.column_names.index("image"), "image", pa.array(images, pa.string()))


def _is_file(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return fs.isfile(path)


def mirror(source: str, target: str) -> None:
    """Make `target` hold exactly what `source` (a file or a folder) holds, each file copied atomically."""
    if _is_file(source):
        storage.copy_file(source, target)
        return
    names = storage.find(source)
    if not names:  # nothing there (a folder emptied or never written): nothing here either
        storage.remove(target)
        return
    for name in names:
        storage.copy_file(storage.join(source, name), storage.join(target, name))
    for name in set(storage.find(target)) - set(names):
        storage.remove(storage.join(target, name))


def installable(run: RunDirectory, subject_id: str, attempt_run: str) -> str | None:
    """Why the retrain in `attempt_run` cannot replace the subject's results in RUN (None: it can): every row RUN's
    tables hold for the subject needs its counterpart there."""
    if not storage.exists(storage.join(subject_dir(attempt_run, subject_id), GENERATIONS)):
        return f"{attempt_run} holds no generations of {subject_id}"
    for name in PASS_TABLES:
        ours = subject_rows(storage.join(run.uri, name), subject_id)
        theirs = subject_rows(storage.join(attempt_run, name), subject_id)
        wanted = set(ours.column("id").to_pylist()) if ours is not None else set()
        missing = wanted - (set(theirs.column("id").to_pylist()) if theirs is not None else set())
        if missing:
            return f"{attempt_run}/{name} lacks {len(missing)} of the subject's rows (e.g. {min(missing)})"
    return None


def archive_first_attempt(run: RunDirectory, subject_id: str) -> str:
    """Copy the subject's first attempt out of RUN (its files, its generations rows, its rows of RUN's pass outputs,
    one file each) into archive_dir; its status.json, written last, says the archive is whole. Returns the folder."""
    target = archive_dir(run.uri, subject_id)
    if storage.exists(storage.join(target, STATUS)):
        return target  # archived whole: RUN may already hold the retrain, which must not be archived over it
    source = subject_dir(run.uri, subject_id)
    for name in ATTEMPT_FILES:
        mirror(storage.join(source, name), storage.join(target, name))
    storage.write_parquet(storage.join(target, GENERATIONS),
                          _moved(_read(storage.join(source, GENERATIONS)), source, target))  # fmt: skip
    for name in PASS_TABLES:
        rows = subject_rows(storage.join(run.uri, name), subject_id)
        if rows is not None:
            storage.write_parquet(storage.join(target, name), _moved(rows, source, target))
    storage.write_json(storage.join(target, STATUS), run.read_status(subject_id).to_json())
    return target


def install_attempt(run: RunDirectory, subject_id: str, attempt_run: str) -> None:
    """Make RUN/subjects/<id> and RUN's tables hold the retrain in `attempt_run`: its files copied in, its
    generations rows as the subject's, and its pass-output rows in place of RUN's with the same ids. The caller
    archives the first attempt before and records the install in status.json after."""
    if run.lease is not None:
        run.lease.check()  # LeaseLost: another driver has RUN now
    source, target = subject_dir(attempt_run, subject_id), subject_dir(run.uri, subject_id)
    for name in ATTEMPT_FILES:
        mirror(storage.join(source, name), storage.join(target, name))
    storage.write_parquet(storage.join(target, GENERATIONS),
                          _moved(_read(storage.join(source, GENERATIONS)), source, target))  # fmt: skip
    for name in PASS_TABLES:
        rows = subject_rows(storage.join(attempt_run, name), subject_id)
        if rows is not None:
            _replace_rows(storage.join(run.uri, name), subject_id, _moved(rows, source, target))


def _replace_rows(folder: str, subject_id: str, rows: pa.Table) -> None:
    """Each part file of the pass output at `folder` with the subject's rows replaced by those of `rows` with the
    same ids, file by file and atomically: the part keeps its name and its ids, so its checkpoint stays true."""
    index = {row_id: i for i, row_id in enumerate(rows.column("id").to_pylist())}
    for part in _parts(folder):
        table = _read(part)
        mine = _of_subject(table, subject_id)
        if not pc.any(mine).as_py():
            continue
        ids = table.filter(mine).column("id").to_pylist()
        replacement = rows.take([index[i] for i in ids]).select(table.column_names).cast(table.schema)
        storage.write_parquet(part, pa.concat_tables([table.filter(pc.invert(mine)), replacement]))
