"""A stand-in for ray_jobs.worker.SubjectWorker that sleeps instead of training, for the scheduling benchmark.

The methods a training run calls (identity, make_class_set, train; not generate, so the benchmark plans the train
stage only), the same outcome dicts, and no torch: what is left of a fleet run is the scheduler, Ray and the run
directory.
Durations come from the environment the benchmark gives every actor (Ray runtime_env env_vars):
SLEEP_WORK_SECONDS (mean seconds per subject), SLEEP_JITTER (each duration is uniform in mean·(1 ± jitter), fixed
per subject id), SLEEP_CLASS_SET_SECONDS, SLEEP_INIT_SECONDS (the stand-in for loading the base model) and
SLEEP_TIMELINE_DIR, where each actor appends one line per call:
"<kind> <subject id or class prompt> <start> <end>" (Unix seconds).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from engine.settings import Settings
from engine.subject import Subject, stable_seed


def work_seconds(subject_id: str, mean: float, jitter: float) -> float:
    """The fixed sleep of one subject: uniform in mean·(1 ± jitter), drawn from its id alone."""
    uniform = stable_seed(subject_id) / 2**63
    return mean * (1 + jitter * (2 * uniform - 1))


class SleepWorker:
    def __init__(self, base_model: str, cache_dir: str | None = None):
        self.mean = float(os.environ["SLEEP_WORK_SECONDS"])
        self.jitter = float(os.environ.get("SLEEP_JITTER", "0"))
        self.class_set_seconds = float(os.environ.get("SLEEP_CLASS_SET_SECONDS", self.mean))
        time.sleep(float(os.environ.get("SLEEP_INIT_SECONDS", "0")))
        folder = os.environ.get("SLEEP_TIMELINE_DIR")
        # Line-buffered: the scheduler kills its actors at the end, and a killed process flushes nothing.
        self.timeline = open(os.path.join(folder, f"{os.getpid()}.txt"), "a", buffering=1) if folder else None

    def identity(self) -> dict[str, Any]:
        import ray

        node = ray.get_runtime_context().get_node_id()[:12]
        # torch_loaded: the benchmark checks that the stand-in really left torch out of the actors.
        return {"pid": os.getpid(), "node": node, "gpu_ids": ray.get_gpu_ids(), "torch_loaded": "torch" in sys.modules}

    def make_class_set(self, class_root: str, class_prompt: str, settings: Settings) -> dict[str, Any]:
        began = self._sleep("class_set", class_prompt.replace(" ", "_"), self.class_set_seconds)
        uris = [f"{class_root}/{stable_seed(class_prompt):x}/{i:05d}.png" for i in range(settings.num_class_images)]
        return {"ok": True, "uris": uris, "generated": len(uris), "seconds": time.perf_counter() - began}

    def train(self, run: str, subject: Subject, settings: Settings, class_uris: list[str] | None) -> dict[str, Any]:
        seconds = work_seconds(subject.subject_id, self.mean, self.jitter)
        began = self._sleep("train", subject.subject_id, seconds)
        steps = settings.max_train_steps
        return {
            "ok": True,
            "resumed_from": None,
            "steps_run": steps,
            "step_seconds": [seconds / steps] * steps,  # the real worker returns one time per step: same payload
            "final_loss": 0.1,
            "seconds": time.perf_counter() - began,
        }

    def _sleep(self, kind: str, name: str, seconds: float) -> float:
        began, start = time.perf_counter(), time.time()
        time.sleep(seconds)
        if self.timeline:
            self.timeline.write(f"{kind} {name} {start:.6f} {time.time():.6f}\n")
        return began
