"""Where a report's files go and how its pages link to them (ray_jobs/report/pages.py)."""

from __future__ import annotations

from ray_jobs.report import pages


def test_links_are_relative_inside_the_report_folder_and_never_scripts():
    layout = pages.ReportLayout("file:///runs/r1/report.html")
    assert layout.link("/runs/r1/subjects/a b/images/p0.png") == "subjects/a%20b/images/p0.png"
    assert layout.link("file:///runs/r1/subjects/a/images/p0.png") == "subjects/a/images/p0.png"
    assert layout.link("/photos/dog.png") == "file:///photos/dog.png"
    assert layout.link("s3://bucket/photos/dog.png") == "s3://bucket/photos/dog.png"
    assert layout.link("javascript://%0aalert(1)") is None
    assert layout.thumb_link("abc.jpg") == "report_files/thumbs/abc.jpg"
