"""`python -m ray_jobs ...` is the `dreamfleet` CLI, for `ray job submit -- python -m ray_jobs run ...`."""

import sys

from ray_jobs.cli import main

sys.exit(main())
