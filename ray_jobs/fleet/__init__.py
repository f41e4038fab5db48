"""The training and rendering fleet: long-lived Ray actors (worker.py), the loop that feeds them packs of subjects
(scheduler.py) and what an attempt returns (outcome.py). Imports engine and ray_jobs.state."""
