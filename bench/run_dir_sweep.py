"""How long the RUN sweep (links leading out, killed writers' temporaries) takes on a large local RUN.

Builds SUBJECTS subject folders of IMAGES empty files each, then times `RunDirectory.check_and_clean` against the
naive walk a user would write (os.walk plus os.path.islink on every name), both over the same tree, warm cache.

    .venv/bin/python bench/run_dir_sweep.py --subjects 5000 --images 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from ray_jobs.state.run_dir import TEMPORARY, RunDirectory


def naive_sweep(root: str) -> int:
    found = 0
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                os.path.realpath(path)
            elif name in files and TEMPORARY.search(name):
                found += 1
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=5000)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "run")
        for s in range(args.subjects):
            folder = os.path.join(root, "subjects", f"s{s}", "images")
            os.makedirs(folder)
            for i in range(args.images):
                open(os.path.join(folder, f"{i}.png"), "w").close()
            open(os.path.join(root, "subjects", f"s{s}", "status.json"), "w").close()
        files = args.subjects * (args.images + 1)
        run = RunDirectory(root)
        ours, naive = [], []
        for _ in range(args.repeats):  # interleaved, so load from other jobs lands on both alike
            began = time.perf_counter()
            run.check_and_clean()
            ours.append(time.perf_counter() - began)
            began = time.perf_counter()
            naive_sweep(root)
            naive.append(time.perf_counter() - began)
    a, b = statistics.median(ours), statistics.median(naive)
    print(f"{files} files: check_and_clean {a:.3f} s ({a / files * 1e6:.2f} s per million files), "
          f"naive os.walk+islink {b:.3f} s; naive / ours = {b / a:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
