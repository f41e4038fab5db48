"""`dreamfleet report`: static HTML reports read from files alone, of a run directory (run_report.py, with each
subject's attempt history from attempts.py) or of a VLM pass output (table_report.py); any_path.py picks which a path
calls for. pages.py says where a report's files go and writes its pages from templates/ (Jinja2, autoescaped, no
JavaScript); thumbnails.py makes the small upright JPEGs every image is shown as, once, beside the report. Links inside
the report's folder are relative, so it can be copied or served as it is.

Imports engine (storage, media, settings), ray_jobs.state and ray_jobs.fleet.outcome (what a run directory holds); no
Ray, and nothing else of ray_jobs: the CLI, the run and the demo import the report, never the reverse.
"""
