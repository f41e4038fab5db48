"""The HTML reports: a run's (run_report.py) and a VLM pass output's (table_report.py), their thumbnails
(thumbnails.py) and Jinja2 templates (templates/). Reads the run directory and pass outputs; no Ray."""
