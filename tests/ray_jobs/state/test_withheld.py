"""Withholding without Ray: which moderation verdicts withhold an image, and the run's generations table."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import storage
from engine.settings import load_settings
from ray_jobs.state.generations import (
    RUN_SCHEMA,
    SCHEMA,
    assemble_generations,
    mark_withheld,
    write_subject_generations,
)
from ray_jobs.state.run_dir import RunDirectory, SubjectStatus, subject_dir
from ray_jobs.state.withheld import count_withheld, delivered, is_unsafe, withheld_ids


@pytest.mark.parametrize(
    ("safe", "score", "error", "threshold", "unsafe"),
    [
        (False, 0.2, None, None, True),  # the model's verdict decides without a threshold
        (True, 0.9, None, None, False),
        (True, 0.0, None, 0.0, True),  # threshold 0: everything is unsafe
        (False, 0.99, None, 1.01, False),  # above every probability: nothing is
        (True, 0.5, None, 0.5, True),  # the threshold itself counts as unsafe
        (True, 0.49, None, 0.5, False),
        (None, None, "model: boom", 0.0, False),  # no verdict: the pass reports the error, nothing is withheld
    ],
)
def test_a_verdict_is_the_models_or_the_threshold_s(safe, score, error, threshold, unsafe):
    assert is_unsafe(safe, score, error, threshold) is unsafe


def _moderation(run: RunDirectory, verdicts: dict[str, tuple[bool, float]]) -> None:
    """A moderation pass output as the pass writes it: part files in a folder."""
    table = pa.table({"id": list(verdicts), "safe": [v[0] for v in verdicts.values()],
                      "score": [v[1] for v in verdicts.values()],
                      "error": pa.nulls(len(verdicts), pa.string())})  # fmt: skip
    storage.write_parquet(storage.join(run.moderation, "part-0.parquet"), table)


def _rows(subject_id: str, n: int) -> list[dict]:
    return [{"id": f"{subject_id}/{k}", "subject_id": subject_id, "prompt": "p", "prompt_index": 0, "image_index": k,
             "seed": k, "image": f"/x/{subject_id}/{k}.png", "guidance_scale": 7.5, "num_inference_steps": 2,
             "scheduler": "ddim"} for k in range(n)]  # fmt: skip


def test_the_runs_table_says_which_images_are_withheld_and_keeps_every_row(tmp_path):
    run = RunDirectory(str(tmp_path / "run"))
    for sid in ("a", "b"):
        write_subject_generations(subject_dir(run.uri, sid), _rows(sid, 2))
        run.write_status(SubjectStatus(sid, state="done"))
    settings = load_settings("tiny")

    # Before moderation every row is delivered, and the column exists in every row.
    assert assemble_generations(run, {"a": {"owner": "x"}}, settings) == 4
    table = pq.read_table(run.generations)
    assert table.schema.names[: len(RUN_SCHEMA)] == RUN_SCHEMA.names and table.column_names[-1] == "owner"
    assert table.column("withheld").to_pylist() == [False] * 4 and count_withheld(run.generations) == 0

    _moderation(run, {"a/0": (False, 0.7), "a/1": (True, 0.2), "b/0": (True, 0.6), "b/1": (True, 0.1)})
    assert withheld_ids(run.moderation, settings) == {"a/0"}
    assert mark_withheld(run, settings) == 1
    table = pq.read_table(run.generations)
    assert table.num_rows == 4 and table.column_names[-1] == "owner"  # same columns, same order
    assert dict(zip(table.column("id").to_pylist(), table.column("withheld").to_pylist())) == {
        "a/0": True, "a/1": False, "b/0": False, "b/1": False}  # fmt: skip
    assert delivered(table).column("id").to_pylist() == ["a/1", "b/0", "b/1"]

    # A threshold decides from the score instead; withholding off delivers everything; a rebuild keeps the decision.
    assert mark_withheld(run, settings.with_overrides({"moderation_threshold": 0.5}, source="t")) == 2
    assert count_withheld(run.generations) == 2
    assert assemble_generations(run, {}, settings.with_overrides({"moderation_threshold": 0.5}, source="t")) == 4
    assert count_withheld(run.generations) == 2
    assert mark_withheld(run, settings.with_overrides({"withhold_unsafe": False}, source="t")) == 0


def test_withholding_is_a_run_setting_not_a_subjects():
    from engine.settings import SettingsError, parse_params

    with pytest.raises(SettingsError, match="whole run"):
        parse_params('{"moderation_threshold": 0.5}')
    assert load_settings("tiny").withhold_unsafe is True and load_settings("sd").moderation_threshold is None
    assert SCHEMA.get_field_index("withheld") == -1  # a subject's own rows carry no verdict: the run decides it
