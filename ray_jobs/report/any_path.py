"""The report of whatever a path is (what `dreamfleet report PATH` writes): a run directory's, or a VLM pass output's
(a folder of Parquet part files, or one Parquet file)."""

from __future__ import annotations

from engine import storage
from ray_jobs.report.pages import ReportError
from ray_jobs.report.run_report import write_run_report
from ray_jobs.report.table_report import write_table_report
from ray_jobs.report.thumbnails import PDF_DPI
from ray_jobs.state.run_dir import RunDirectory


def write_report(uri: str, out: str | None = None, pdf_dpi: float = PDF_DPI, show_withheld: bool = False) -> str:
    """The report of whatever `uri` is: a run directory (it has run.json), a pass output (a folder of Parquet part
    files) or a Parquet file; its URI. `pdf_dpi`: a pass output's (see write_table_report); `show_withheld`: a run's
    (see write_run_report)."""
    if storage.exists(RunDirectory(uri).run_json):
        return write_run_report(uri, out, show_withheld)
    fs, path = storage.filesystem(uri)
    try:
        if fs.isdir(path):
            if not any(f.endswith(".parquet") for f in fs.find(path)):
                raise ReportError(f"{uri}: a directory with neither run.json nor Parquet part files")
            return write_table_report(uri, out, pdf_dpi)
        with fs.open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ReportError(f"{uri}: no such file or directory") from None
    except OSError as err:
        raise ReportError(f"{uri}: cannot read ({type(err).__name__}: {err})") from None
    if magic != b"PAR1":
        raise ReportError(f"{uri}: neither a run directory (no run.json) nor a Parquet file")
    return write_table_report(uri, out, pdf_dpi)