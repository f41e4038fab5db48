"""The command line as a user meets it: exit statuses and messages of `dreamfleet validate`."""

from ray_jobs.cli import main
from ray_jobs.state.manifest import write_subjects_manifest
from tests.helpers.subjects import make_subject_rows


def test_validate_subjects_exit_status_and_bad_rows(tmp_path, capsys):
    rows = make_subject_rows(tmp_path / "images", 2)
    good = str(tmp_path / "good.parquet")
    write_subjects_manifest(good, rows)
    assert main(["validate", good]) == 0
    assert "2 rows, 2 valid, 0 invalid" in capsys.readouterr().out

    bad_rows = [*rows, {**rows[0], "subject_id": "has space"}, {**rows[1], "instance_images": [str(tmp_path / "x.png")]}]
    bad = str(tmp_path / "bad.parquet")
    write_subjects_manifest(bad, bad_rows)
    assert main(["validate", bad]) == 2
    out = capsys.readouterr().out
    assert "row 2 (subject 'has space')" in out and "row 3 (subject 's1')" in out and "no such file" in out


def test_validate_refuses_what_is_not_a_manifest(tmp_path, capsys):
    path = tmp_path / "notes.parquet"
    path.write_text("not parquet")
    assert main(["validate", str(path)]) == 2
    assert "not a Parquet file" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "absent.parquet")]) == 2
