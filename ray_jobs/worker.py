"""The fleet's worker: one long-lived process per GPU slot that loads the base model once and serves many subjects.

Methods return plain outcome dicts instead of raising, so the scheduler can tell a subject's own failure (bad
image, NaN loss, OOM) from the death of the worker process itself.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import torch

from engine import storage
from engine.checkpoints import CheckpointError
from engine.class_images import ClassImageCache
from engine.generation import render_subject
from engine.images import ImageError
from engine.models import default_device, load_base_model, resolve_base_model
from engine.settings import Settings, SettingsError
from engine.subject import Subject
from engine.train import train_subject
from engine.weights import load_subject_weights
from ray_jobs.generations import write_subject_generations
from ray_jobs.run_dir import subject_dir

# Failures that come from the subject's own input: trying again would fail the same way.
PERMANENT_ERRORS = (ImageError, CheckpointError, SettingsError)


def _peak_gpu_memory() -> int:
    """Peak GPU memory of this process since the last call (0 without a GPU), then reset for the next attempt."""
    if not torch.cuda.is_available():
        return 0
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


def _failure(err: BaseException, **extra: Any) -> dict[str, Any]:
    return {
        "ok": False,
        "error": f"{type(err).__name__}: {err}",
        "retryable": not isinstance(err, PERMANENT_ERRORS),
        "oom": isinstance(err, torch.cuda.OutOfMemoryError),
        "traceback": traceback.format_exc(limit=8),
        "peak_gpu_memory_bytes": _peak_gpu_memory(),
        **extra,
    }


class SubjectWorker:
    def __init__(self, base_model: str, cache_dir: str | None = None, cpu_threads: int = 1):
        device = default_device()
        if device.type == "cpu":
            # Several workers share the machine's cores; one thread each avoids oversubscribing them.
            torch.set_num_threads(cpu_threads)
        self.base = load_base_model(resolve_base_model(base_model, cache_dir), device)

    def identity(self) -> dict[str, Any]:
        """Where this worker runs: its process and the GPU ids Ray assigned it (shared ids mean packed slots)."""
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()[:12], "gpu_ids": ray.get_gpu_ids()}

    def make_class_set(self, class_root: str, class_prompt: str, settings: Settings) -> dict[str, Any]:
        began = time.perf_counter()
        try:
            result = ClassImageCache(class_root).ensure(self.base, class_prompt, settings)
        except Exception as err:
            return _failure(err)
        return {"ok": True, "uris": result.uris, "generated": result.generated, "seconds": time.perf_counter() - began}

    def train(self, run: str, subject: Subject, settings: Settings, class_uris: list[str] | None) -> dict[str, Any]:
        steps_run = []
        began = time.perf_counter()
        try:
            result = train_subject(
                self.base, subject, settings, subject_dir(run, subject.subject_id), class_uris,
                on_step=lambda record: steps_run.append(record.seconds),
            )  # fmt: skip
        except Exception as err:
            return _failure(err, steps_run=len(steps_run))
        return {
            "ok": True,
            "resumed_from": result.resumed_from,
            "steps_run": len(steps_run),
            "step_seconds": steps_run,
            "final_loss": result.losses[-1],
            "seconds": time.perf_counter() - began,
            "peak_gpu_memory_bytes": _peak_gpu_memory(),
        }

    def generate(self, run: str, subject: Subject, settings: Settings) -> dict[str, Any]:
        """Render the subject's prompts with its trained weights on the resident model, then take them off."""
        began = time.perf_counter()
        folder = subject_dir(run, subject.subject_id)
        try:
            before = len(storage.listdir(storage.join(folder, "images")))
            if subject.prompts:
                load_subject_weights(self.base, settings, storage.join(folder, "weights"))
            rows = render_subject(self.base, subject, settings, storage.join(folder, "images"))
            write_subject_generations(folder, rows)
        except Exception as err:
            return _failure(err)
        finally:
            self.base.reset()
        return {"ok": True, "images": len(rows), "images_generated": len(rows) - before,
                "seconds": time.perf_counter() - began, "peak_gpu_memory_bytes": _peak_gpu_memory()}  # fmt: skip
