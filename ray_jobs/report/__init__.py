"""`dreamfleet report`: a static HTML report of a run directory or of a VLM pass output, read from its files alone.

Pages are plain HTML and CSS (Jinja2 templates in templates/, autoescaped; no JavaScript: what a script would sort,
page 1 lists already sorted, the evaluated subjects worst first). Every image is shown as a small JPEG thumbnail made
once under `<report>_files/thumbs/` and linked to the full-size image; links inside the report's folder are relative,
so the folder can be copied or served as it is.

The folder: pages.py (where the files go, page writing), thumbnails.py, run_report.py (a run's report),
table_report.py (a pass output's), paths.py... Imports engine and ray_jobs.state; no Ray.
"""
