"""What a command decides before anything runs, and what it records: the subjects manifest, the run directory and its
files, the subject states, the plan of a (re)run. Plain Python over fsspec and pyarrow: no Ray import here."""
