"""Packed LoRA training and generation on `tiny-flux`, CPU, one torch thread: subjects per CPU-hour at K = 1, 2, 4, 8
against one at a time, in the same run, as ratios.

The same measurement as bench/pack_training_cpu.py (whose subjects, variants and tables it reuses) on the FLUX family:
a FluxTransformer2DModel with the guidance embedding on, flow matching with the tiny-flux preset (LoRA r8 on the
attention and feed-forward layers of both block kinds, 32 px, max_sequence_length 32), prior preservation on with one
shared class set made before any timing. Each variant is timed whole: examples encoding (VAE, CLIP and T5 once per
subject), every step, checkpoints and the export; generation: 2 prompts x 2 images per subject, FlowMatch Euler,
guidance embedding 3.5, one at a time against all subjects in one pack.

Run from the repo root (minutes on 2 cores):
    .venv/bin/python bench/pack_training_flux_cpu.py [--subjects 8] [--steps 20] [--packs 1 2 4 8] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.pack_training_cpu import CLASS_PROMPT, PROMPTS, make_subjects, print_tables, run_round  # noqa: E402
from engine.diffusion.base_model import load_base_model, resolve_base_model  # noqa: E402
from engine.diffusion.class_images import ClassImageCache  # noqa: E402
from engine.settings import load_settings  # noqa: E402

BASE = "tiny-flux"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="training steps per subject (tiny default: 100)")
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8], help="capacities K to measure")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every variant; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a fleet worker has one core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_base_model(resolve_base_model(BASE), "cpu")
    settings = load_settings(BASE, overrides={"max_train_steps": args.steps})
    with tempfile.TemporaryDirectory(prefix="bench-pack-flux-") as tmp:
        work = Path(tmp)
        subjects = make_subjects(work, args.subjects)
        class_uris = ClassImageCache(str(work / "class_images")).ensure(base, CLASS_PROMPT, settings).uris
        load_before = os.getloadavg()[0]
        rounds = [
            run_round(base, subjects, settings, class_uris, args.packs, work / f"round{r}", args.subjects)
            for r in range(args.rounds)
        ]
    images = args.subjects * len(PROMPTS) * settings.num_images_per_prompt
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); 1-min load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")  # fmt: skip
    print(f"settings: {BASE} preset, max_train_steps {args.steps}, prior preservation on ({len(class_uris)} class "
          f"images), checkpointing_steps {settings.checkpointing_steps}, resolution {settings.resolution}, "
          f"max_sequence_length {settings.max_sequence_length}, generation_batch_size "
          f"{settings.generation_batch_size}, {settings.num_inference_steps} FlowMatch Euler steps")  # fmt: skip
    print_tables(rounds, args.subjects, images)


if __name__ == "__main__":
    main()
