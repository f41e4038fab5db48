"""The report tests' fixtures: Chromium, as a user's browser, and a run directory built by hand with its report."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ray_jobs.report import run_report
from tests.helpers.report_inputs import build_run


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (CI installs it in .ci/run)")
    return found


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> dict:
    built = build_run(str(tmp_path_factory.mktemp("report")))
    built["report"] = Path(run_report.write_run_report(built["run"]))
    return built
