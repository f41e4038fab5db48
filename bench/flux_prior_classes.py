"""tiny-flux-prior's build cost and class separation over seeds: CPU seconds to build, and for each class prompt the
margin by which its images (stock FluxPipeline, 8 images, 20 steps) are nearer their own class's drawn instances
than any other class's (mean |pixel| in 0-255, each image to its nearest instance, as the test measures it).

    PYTHONPATH=. taskset -c 0 .venv/bin/python bench/flux_prior_classes.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.library_logging import quiet_libraries  # noqa: E402
from engine.tiny.flux_prior import TEXT_LENGTH, build_tiny_flux_prior  # noqa: E402
from engine.tiny.prior import CLASSES, class_prompt, draw_class_images  # noqa: E402


def _array(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def margins(path: Path, guidance: float, text_length: int) -> dict[str, float]:
    """Per class: the nearest other class's distance minus its own (positive: the prompt renders its class)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    reference = {name: _array(draw_class_images(name, 64, seed=2)) for name in CLASSES}
    found = {}
    for name in CLASSES:
        drawn = _array(pipe([class_prompt(name)] * 8, height=32, width=32, num_inference_steps=20,
                            guidance_scale=guidance, max_sequence_length=text_length,
                            generator=[torch.Generator().manual_seed(i) for i in range(8)]).images)  # fmt: skip
        distance = {other: float(np.abs(drawn[:, None] - reference[other][None]).mean((2, 3, 4)).min(1).mean())
                    for other in CLASSES}  # fmt: skip
        found[name] = min(d for other, d in distance.items() if other != name) - distance[name]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.5])
    parser.add_argument("--text-lengths", type=int, nargs="+", default=[TEXT_LENGTH, 77])
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    print("| seed | build CPU s | guidance | T5 tokens | " + " | ".join(CLASSES) + " |")
    print("| --- " * (4 + len(CLASSES)) + "|")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="flux-prior-") as work:
            began = time.process_time()
            build_tiny_flux_prior(Path(work), seed=seed)
            cpu = time.process_time() - began
            for guidance in args.guidance:
                for length in args.text_lengths:
                    found = margins(Path(work), guidance, length)
                    cells = " | ".join(f"{found[name]:.1f}" for name in CLASSES)
                    print(f"| {seed} | {cpu:.0f} | {guidance:g} | {length} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
