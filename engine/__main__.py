"""`python -m engine train ...`: DreamBooth for one subject on one device, no Ray, no manifest.

Example:
    python -m engine train --images a.jpg b.jpg c.jpg --instance-prompt "a photo of sks dog" \
        --class-prompt "a photo of a dog" --out runs/dog --base-model tiny --set max_train_steps=50
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from engine import storage
from engine.diffusion.base_model import load_base_model, resolve_base_model
from engine.diffusion.class_images import ClassImageCache
from engine.diffusion.subject import Subject
from engine.diffusion.train import train_subject
from engine.hub import default_device
from engine.settings import SettingsError, load_settings, parse_assignments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one subject")
    train.add_argument("--images", nargs="+", required=True, help="instance image URIs (any fsspec URI)")
    train.add_argument("--instance-prompt", required=True)
    train.add_argument("--class-prompt")
    train.add_argument("--subject-id", default="subject")
    train.add_argument("--seed", type=int)
    train.add_argument("--out", required=True, help="subject directory (any fsspec URI)")
    train.add_argument("--class-images", help="class-image cache root (default: OUT/class_images)")
    train.add_argument("--base-model", default="tiny")
    train.add_argument("--config", help="YAML settings file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    train.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    args = parser.parse_args(argv)

    try:
        settings = load_settings(args.base_model, args.config, parse_assignments(args.set))
        subject = Subject(args.subject_id, tuple(args.images), args.instance_prompt, args.class_prompt, seed=args.seed)
    except (SettingsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if settings.with_prior_preservation and not subject.class_prompt:
        print("error: --class-prompt is required when with_prior_preservation is on", file=sys.stderr)
        return 2

    base = load_base_model(resolve_base_model(args.base_model), args.device or default_device())
    class_uris = None
    if settings.with_prior_preservation:
        cache = ClassImageCache(args.class_images or storage.join(args.out, "class_images"))
        class_uris = cache.ensure(base, subject.class_prompt, settings).uris
    began = time.perf_counter()
    result = train_subject(base, subject, settings, args.out, class_uris)
    summary = {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
        "seconds": round(time.perf_counter() - began, 2),
        "weights": result.weights_uri,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
