"""`dreamfleet report PATH` (ray_jobs/report/any_path.py): a run directory, a pass output folder or a Parquet file,
and nothing else."""

from __future__ import annotations

from pathlib import Path

from engine import storage
from ray_jobs.cli import main
from ray_jobs.report import pages


def test_the_report_command_takes_a_run_or_a_parquet_file_and_nothing_else(small_run, tmp_path, capsys):
    assert main(["report", small_run["run"]]) == 0
    assert capsys.readouterr().out.strip() == pages.report_path_for(small_run["run"])
    out = tmp_path / "elsewhere" / "moderation.html"
    assert main(["report", storage.join(small_run["run"], "moderation.parquet"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.exists()

    manifest = storage.join(small_run["run"], "..", "subjects.parquet")  # any Parquet file, even without VLM columns
    assert main(["report", manifest]) == 0
    assert "rows<b>3</b>" in Path(capsys.readouterr().out.strip()).read_text()

    (tmp_path / "notes.txt").write_text("hello")
    for path, message in [(tmp_path / "notes.txt", "neither a run directory"), (tmp_path, "neither run.json nor Parquet part files"),
                          (tmp_path / "absent", "no such file")]:  # fmt: skip
        assert main(["report", str(path)]) == 2
        assert message in capsys.readouterr().err
