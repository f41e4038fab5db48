"""Ray Data passes over tables of rows: their input (inputs.py), the VLM pass (analyze.py), the evaluation pass
(evaluate.py), the part-file output and its checkpoint (output.py), the resource check (resources.py) and live
figures (stats.py). Imports engine, ray_jobs.state and the driver-side modules (progress, metrics)."""
