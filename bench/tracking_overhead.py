"""What experiment tracking costs a training step: a pack of tiny subjects on the CPU (one torch thread), each step's
tracker calls (`SubjectTracker.log_step`, every subject of the pack) timed apart from the pack step itself.

For each tool alone and for all three together: median seconds of the pack step without its tracker calls, and
median and max seconds of the step's tracker calls (all subjects). MLflow on a SQLite store (its buffer is sent at
every checkpoint), W&B offline, TensorBoard into a local RUN; a checkpoint every `--checkpointing-steps`.

Run from the repo root (a minute or two on 2 cores):
    .venv/bin/python bench/tracking_overhead.py [--subjects 4] [--steps 40] [--checkpointing-steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.pack_training_cpu import draw_ball  # noqa: E402
from engine.diffusion.base_model import load_base_model, resolve_base_model  # noqa: E402
from engine.diffusion.class_images import ClassImageCache  # noqa: E402
from engine.diffusion.subject import Subject  # noqa: E402
from engine.diffusion.train import PackTrainer  # noqa: E402
from engine.settings import load_settings  # noqa: E402
from engine.tracking import SubjectTracker, start_group  # noqa: E402


def measure(base, subjects, settings, class_uris, trackers, root: Path) -> tuple[list[float], list[float]]:
    """(pack step seconds without tracking, tracker seconds of that step) for every step after the first."""
    run = root / f"run-{'-'.join(trackers)}"
    group = start_group(str(run), trackers)
    assert not group.failed, group.failed
    trainer = PackTrainer(base, settings, capacity=len(subjects))
    tracked: dict[str, SubjectTracker] = {}
    spent = [0.0]

    def on_step(sid):
        def stepped(record):
            began = time.perf_counter()
            tracked[sid].log_step(record)
            spent[0] += time.perf_counter() - began

        return stepped

    for subject in subjects:
        folder = str(run / "subjects" / subject.subject_id)
        member = trainer.admit(subject, settings, folder, class_uris, on_step(subject.subject_id))
        tracked[subject.subject_id] = SubjectTracker(group, subject.subject_id, settings, folder, member.step)
    steps, tracking = [], []
    while trainer.members:
        spent[0] = 0.0
        began = time.perf_counter()
        trainer.step()
        total = time.perf_counter() - began
        steps.append(total - spent[0])
        tracking.append(spent[0])
    trainer.close()
    for tracker in tracked.values():
        assert tracker.close() == [], tracker.errors
    return steps[1:], tracking[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpointing-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="tracking-bench-"))
    os.chdir(root)
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", WANDB_MODE="offline", WANDB_DIR=str(root))
    base = load_base_model(resolve_base_model("tiny"), "cpu")
    settings = load_settings("tiny", overrides={"max_train_steps": args.steps, "num_class_images": 4,
                                                "checkpointing_steps": args.checkpointing_steps})  # fmt: skip
    class_uris = ClassImageCache(str(root / "class_images")).ensure(base, "a photo of a ball", settings).uris
    subjects = [Subject(f"s{i}", draw_ball(root / "images" / f"s{i}", i), "a photo of sks ball", "a photo of a ball",
                        seed=i) for i in range(args.subjects)]  # fmt: skip
    print(f"{args.subjects} subjects per pack, {args.steps} steps, a checkpoint every {args.checkpointing_steps}")
    print("| trackers | pack step s (median) | tracker calls s per step: median | max | median share of the step |")
    print("| --- | --- | --- | --- | --- |")
    for trackers in (("tensorboard",), ("mlflow",), ("wandb",), ("tensorboard", "mlflow", "wandb")):
        steps, tracking = measure(base, subjects, settings, class_uris, trackers, root)
        step, calls = statistics.median(steps), statistics.median(tracking)
        print(f"| {', '.join(trackers)} | {step:.4f} | {calls:.5f} | {max(tracking):.4f} | {calls / step:.2%} |")


if __name__ == "__main__":
    main()
