"""Packed LoRA training at FLUX.1 [dev]'s real transformer shapes on one GPU: seconds per packed step and peak memory
for K subjects per batch, with and without gradient checkpointing, against the stock one-subject peft loop, projected
to subjects per GPU-hour (issue 24).

The transformer only, with random weights: FluxTransformer2DModel with FLUX.1 [dev]'s config (19 double-stream and
38 single-stream blocks, 24 heads of 128 = 3072 wide, joint_attention_dim 4096, pooled 768, guidance embedding,
64 input channels), built on the meta device and materialised on the GPU in bf16 (nothing is saved or downloaded),
frozen. What the engine caches before training stands in for the rest: each sample's VAE latents (16 channels at
1/8 of 512 px, packed 2x2: 1,024 image tokens) and its T5 hidden states (512 tokens) and CLIP pooled embedding are
random tensors already on the GPU, so no VAE or text encoder runs inside a timed step (the engine encodes a subject's
images and prompts once, at admission: a few forward passes per subject, left out of the projection).

A step of K subjects packed: 2K samples (each subject's instance sample and one class sample, prior preservation),
flow matching (noisy = (1 - s) x + s n, target n - x, s logit-normal), guidance input 3.5 as diffusers'
train_dreambooth_lora_flux.py passes it, each subject's loss = instance MSE + class MSE into its own LoRA slot
(engine/diffusion/packed_lora.py's LoraPack, rank 16 on every attention and feed-forward Linear of both block kinds, fp32
master weights), then one AdamW per subject (lr 4e-4). The LoRA update of the routed layers runs two ways:
- `bmm`: LoraPack as the engine has it (per-sample gathered A and B, batched matmul);
- `grouped`: the same layers through `torch._grouped_mm` over the batch's tokens grouped by slot (samples sorted by
  slot; one 2-D x 3-D grouped GEMM for A, one for B), a candidate for engine/diffusion/packed_lora.py where it measures faster.
The stock loop beside it: peft's LoRA (`transformer.add_adapter`, same targets, rank 16) on the same frozen
transformer, one subject a step (batch 2: instance + class), bf16 LoRA weights under bf16 autocast, as diffusers'
script runs with `--mixed_precision bf16`, on the same cached inputs.

Measured, in this order, each skipped once `--budget-s` has run out (so the table always prints):
1. rendering: no-grad transformer passes over a batch of `--gen-batch` images routed through K = 4 slots; seconds per
   image = s per pass / batch x `--gen-steps` (FLUX.1 [dev]'s 28; one pass a step, the guidance is an input);
2. packed steps, gradient checkpointing on, K = 1, 2, 4, 8, bmm; a check that the grouped route computes what bmm
   does (velocity and LoRA gradients of one batch, relative difference); the sweep with grouped GEMMs; then
   checkpointing off, bmm, until a K runs out of memory;
3. the stock loop, checkpointing on, then off.
Each: `--warmup` steps, then the median of `--steps` steps, each between two torch.cuda.synchronize; peak memory is
torch.cuda.max_memory_allocated over the timed steps.
Projection per GPU-hour, a shared class set of `--class-images` rendered once an hour:
  subjects = (3600 - class_images x s/image) / (`--train-steps` x s/step / K + `--images` x s/image).

On the GPU machine, from the repo root (a guess, not measured: 5-7 minutes on an H100; `--budget-s` 420 cuts what is
left; JSON also to $OUT/gpu_flux_train.json when OUT is set):
    python bench/gpu_flux_train.py
Check on CPU at tiny shapes (its timings mean nothing; about a minute):
    .venv/bin/python bench/gpu_flux_train.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# gpu_pack_train (through gpu_train_step) names any missing package at import, before device time is spent.
from bench.gpu_pack_train import Clock, free_memory, peak_gb  # noqa: E402
from engine.library_logging import quiet_libraries  # noqa: E402
from engine.diffusion.packed_lora import LoraPack, RoutedLoraLinear  # noqa: E402

STARTED = time.perf_counter()
# black-forest-labs/FLUX.1-dev's transformer/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])  # fmt: skip
# diffusers' own test config, with the guidance embedding on: the smoke run's shapes
FLUX_SMOKE = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=[4, 4, 8])  # fmt: skip
# The Linear layers diffusers' FLUX LoRA scripts target, in both block kinds (single blocks have no to_out)
TARGET_SUFFIXES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                   "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                   "ff_context.net.2", "proj_mlp", "proj_out")  # fmt: skip
GUIDANCE, LEARNING_RATE = 3.5, 4e-4


def build_transformer(config: dict, device: torch.device):
    """FLUX's transformer with random weights: built on the meta device (no host memory, no init time), then
    materialised on `device` in bf16 and filled with N(0, 0.02); frozen."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**config)
    transformer = transformer.to(torch.bfloat16).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for tensor in [*transformer.parameters(), *transformer.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02, generator=generator)
    return transformer.requires_grad_(False)


def lora_targets(transformer) -> list[str]:
    """Full names of the targeted Linears inside the blocks (the final proj_out shares a suffix and is left out)."""
    return [
        name for name, module in transformer.named_modules()
        if "transformer_blocks." in name and isinstance(module, torch.nn.Linear) and name.endswith(TARGET_SUFFIXES)
    ]  # fmt: skip


class Inputs:
    """What the engine has cached for 2K samples: packed latents, T5 states, CLIP pooled; random, on the device."""

    def __init__(self, transformer, samples: int, image_tokens: int, text_tokens: int, device: torch.device):
        config = transformer.config
        g = torch.Generator(device).manual_seed(samples)
        bf16 = dict(device=device, dtype=torch.bfloat16, generator=g)
        self.latents = torch.randn(samples, image_tokens, config.in_channels, **bf16)
        self.noise = torch.randn(samples, image_tokens, config.in_channels, **bf16)
        self.text = torch.randn(samples, text_tokens, config.joint_attention_dim, **bf16)
        self.pooled = torch.randn(samples, config.pooled_projection_dim, **bf16)
        self.sigmas = torch.sigmoid(torch.randn(samples, device=device, generator=g))
        self.guidance = torch.full((samples,), GUIDANCE, device=device)
        side = int(image_tokens**0.5)
        self.img_ids = torch.zeros(side, side, 3, device=device)
        self.img_ids[..., 1] += torch.arange(side, device=device)[:, None]
        self.img_ids[..., 2] += torch.arange(side, device=device)[None, :]
        self.img_ids = self.img_ids.reshape(-1, 3)
        self.txt_ids = torch.zeros(text_tokens, 3, device=device)

    def velocity(self, transformer, rows: slice = slice(None)) -> torch.Tensor:
        s = self.sigmas[rows].to(torch.bfloat16)[:, None, None]
        noisy = (1 - s) * self.latents[rows] + s * self.noise[rows]
        return transformer(hidden_states=noisy, timestep=self.sigmas[rows], guidance=self.guidance[rows],
                           pooled_projections=self.pooled[rows], encoder_hidden_states=self.text[rows],
                           txt_ids=self.txt_ids, img_ids=self.img_ids, return_dict=False)[0]  # fmt: skip

    def loss_per_sample(self, transformer) -> torch.Tensor:
        """Flow matching: the velocity n - x, MSE per sample (weighting `none`)."""
        target = (self.noise - self.latents).float()
        return F.mse_loss(self.velocity(transformer).float(), target, reduction="none").mean((1, 2))


# -- the grouped-GEMM route ----------------------------------------------------------------------------------------


class GroupOffsets:
    """Per sequence length (image tokens, text tokens, both in the single blocks), the cumulative token count of
    each slot's samples as int32 on the device, and each token's LoRA scale; made on first use, then reused."""

    def __init__(self, pack: LoraPack, slots: list[int], device: torch.device):
        if slots != sorted(slots):
            raise ValueError("grouped GEMMs need each slot's samples together: sort the batch by slot")
        self.pack, self.slots, self.device, self.by_length = pack, slots, device, {}

    def __call__(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens not in self.by_length:
            counts = torch.tensor([self.slots.count(slot) * tokens for slot in range(self.pack.capacity)])
            scales = torch.tensor([self.pack.scales[s] for s in self.slots]).repeat_interleave(tokens)
            self.by_length[tokens] = (counts.cumsum(0).to(self.device, torch.int32), scales.to(self.device))
        return self.by_length[tokens]


def grouped_forward(layer: RoutedLoraLinear, offsets: GroupOffsets, x: torch.Tensor) -> torch.Tensor:
    """RoutedLoraLinear's update through two grouped GEMMs over the batch's tokens, one group per slot."""
    out = layer.base_layer(x)
    if layer.route.slots is None:
        return out
    a = torch.stack(tuple(layer.lora_A)).to(x.dtype).transpose(1, 2)  # [slots, in, r], column-major as CUDA wants
    b = torch.stack(tuple(layer.lora_B)).to(x.dtype).transpose(1, 2)  # [slots, r, out]
    h = x.reshape(-1, x.shape[-1])
    offs, token_scales = offsets(h.shape[0] // x.shape[0])
    delta = torch._grouped_mm(torch._grouped_mm(h, a, offs=offs), b, offs=offs) * token_scales.to(x.dtype)[:, None]
    return out + delta.reshape(out.shape).to(out.dtype)


def use_grouped(pack: LoraPack, slots: list[int], device: torch.device) -> None:
    """Route `pack`'s layers through grouped_forward for a batch whose sample i is in slot slots[i] (sorted)."""
    offsets = GroupOffsets(pack, slots, device)
    for layer in pack.layers["transformer"].values():
        layer.forward = types.MethodType(lambda self, x: grouped_forward(self, offsets, x), layer)


def grouped_matches_bmm(transformer, args, device: torch.device) -> dict:
    """Both routes on the same 2 subjects' batch (B drawn nonzero, so the adapters matter): the largest difference in
    velocity and in the LoRA gradients, relative to their largest magnitude. Checkpointing on, to fit like a step."""
    pack = LoraPack.attach({"transformer": (transformer, lora_targets(transformer))}, args.rank, capacity=2)
    generator = torch.Generator().manual_seed(0)
    for slot in range(2):
        pack.init_slot(slot, alpha=args.rank, generator=generator)
        with torch.no_grad():
            for layer in pack.layers["transformer"].values():
                layer.lora_B[slot].copy_(torch.randn(layer.lora_B[slot].shape, generator=generator) * 0.02)
    inputs, slots = Inputs(transformer, 4, args.image_tokens, args.text_tokens, device), [0, 0, 1, 1]
    transformer.train()
    transformer.enable_gradient_checkpointing()
    outputs = []
    try:
        for impl in ("bmm", "grouped"):
            if impl == "grouped":
                use_grouped(pack, slots, device)
            with pack.routed(transformer=slots):
                velocity = inputs.velocity(transformer)
                velocity.float().square().mean().backward()
            grads = torch.cat([p.grad.flatten() for slot in range(2) for p in pack.parameters(slot).values()])
            outputs.append((velocity.detach().float(), grads))
            for slot in range(2):
                for p in pack.parameters(slot).values():
                    p.grad = None
    except RuntimeError as err:
        return {"error": str(err).splitlines()[0][:200]}
    finally:
        pack.detach()
        transformer.eval()
        free_memory(device)
    (v0, g0), (v1, g1) = outputs
    return {"velocity_rel_diff": float((v0 - v1).abs().max() / v0.abs().max()),
            "grad_rel_diff": float((g0 - g1).abs().max() / g0.abs().max())}  # fmt: skip


# -- measurements --------------------------------------------------------------------------------------------------


def out_of_time(args) -> bool:
    return time.perf_counter() - STARTED > args.budget_s


def timed_steps(step, args, clock: Clock) -> dict:
    """`--warmup` steps, then the median of `--steps`; peak memory over the timed ones."""
    for _ in range(args.warmup):
        step()
    free_memory(clock.device)
    seconds = []
    for _ in range(args.steps):
        began = clock.now()
        step()
        seconds.append(clock.now() - began)
    return {"s_per_step": statistics.median(seconds), "peak_gb": peak_gb(clock.device)}


def measure_pack(transformer, k: int, impl: str, checkpointing: bool, args, device: torch.device) -> dict:
    """K subjects' slots on the transformer, 2K samples a step (each subject's instance and class sample)."""
    if out_of_time(args):
        return {"skipped": "time budget"}
    free_memory(device)
    pack = LoraPack.attach({"transformer": (transformer, lora_targets(transformer))}, args.rank, capacity=k)
    slots = [slot for slot in range(k) for _ in range(2)]
    inputs = Inputs(transformer, 2 * k, args.image_tokens, args.text_tokens, device)
    optimizers = []
    for slot in range(k):
        pack.init_slot(slot, alpha=args.rank, generator=torch.Generator().manual_seed(slot))
        optimizers.append(torch.optim.AdamW(pack.parameters(slot).values(), lr=LEARNING_RATE, weight_decay=1e-4))
    if impl == "grouped":
        use_grouped(pack, slots, device)
    transformer.train()
    (transformer.enable_gradient_checkpointing if checkpointing else transformer.disable_gradient_checkpointing)()

    def step() -> None:
        with pack.routed(transformer=slots):
            losses = inputs.loss_per_sample(transformer).view(k, 2).sum(1)  # instance + class, per subject
            losses.sum().backward()  # each slot's gradient is its own subject's: the slots share no parameter
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    try:
        result = timed_steps(step, args, Clock(device))
    except torch.cuda.OutOfMemoryError:
        result = {"oom": True}
    except RuntimeError as err:  # a grouped GEMM this device or build does not support
        result = {"error": str(err).splitlines()[0][:200]}
    finally:
        pack.detach()
        transformer.eval()
        del pack, optimizers, inputs
    free_memory(device)
    return {"k": k, **result}


def sweep(transformer, impl: str, checkpointing: bool, args, device: torch.device) -> list[dict]:
    rows = []
    for k in args.packs:
        rows.append(measure_pack(transformer, k, impl, checkpointing, args, device))
        print(f"  {impl}, checkpointing {checkpointing}: {rows[-1]}", file=sys.stderr, flush=True)
        if "s_per_step" not in rows[-1]:
            break  # out of memory, time or support: a larger pack would be too
    return rows


def measure_stock(transformer, args, device: torch.device) -> dict:
    """diffusers' FLUX DreamBooth LoRA step: peft adapter, one subject, batch 2 (instance + class), bf16 autocast;
    checkpointing on, then off, on one adapter (the transformer keeps peft's wrappers after: measured last)."""
    if out_of_time(args):
        return {"skipped": "time budget"}
    from peft import LoraConfig

    free_memory(device)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                        target_modules=lora_targets(transformer))  # fmt: skip
    transformer.add_adapter(config, adapter_name="stock")
    params = [p for p in transformer.parameters() if p.requires_grad]
    described = {"k": 1, "lora_params": sum(p.numel() for p in params), "lora_dtype": str(params[0].dtype)}
    inputs = Inputs(transformer, 2, args.image_tokens, args.text_tokens, device)
    transformer.train()
    results = {}
    for checkpointing in (True, False):
        name = "checkpointing" if checkpointing else "no checkpointing"
        if out_of_time(args):
            results[name] = {**described, "skipped": "time budget"}
            continue
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=1e-4)
        (transformer.enable_gradient_checkpointing if checkpointing else transformer.disable_gradient_checkpointing)()

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                losses = inputs.loss_per_sample(transformer)
            (losses[0] + losses[1]).backward()  # instance loss + prior_loss_weight (1) x class loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            results[name] = {**described, **timed_steps(step, args, Clock(device))}
        except torch.cuda.OutOfMemoryError:
            results[name] = {**described, "oom": True}
        del optimizer, step
        free_memory(device)
        print(f"  stock, {name}: {results[name]}", file=sys.stderr, flush=True)
    transformer.eval()
    return results


@torch.no_grad()
def measure_rendering(transformer, args, device: torch.device) -> dict:
    """Seconds per image at `--gen-steps` sampler steps: no-grad passes over `--gen-batch` images, 4 slots routed."""
    free_memory(device)
    k = 4
    pack = LoraPack.attach({"transformer": (transformer, lora_targets(transformer))}, args.rank, capacity=k)
    for slot in range(k):
        pack.init_slot(slot, alpha=args.rank, generator=torch.Generator().manual_seed(slot))
    inputs = Inputs(transformer, args.gen_batch, args.image_tokens, args.text_tokens, device)
    slots = [i * k // args.gen_batch for i in range(args.gen_batch)]
    try:
        with pack.routed(transformer=slots):
            timed = timed_steps(lambda: inputs.velocity(transformer), args, Clock(device))
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    finally:
        pack.detach()
        del pack, inputs
        free_memory(device)
    s_per_image = timed["s_per_step"] / args.gen_batch * args.gen_steps
    return {"s_per_pass": timed["s_per_step"], "batch": args.gen_batch, "s_per_image": s_per_image,
            "peak_gb": timed["peak_gb"]}  # fmt: skip


def run(args, device: torch.device) -> dict:
    transformer = build_transformer(FLUX_SMOKE if args.smoke else FLUX_DEV, device)
    results: dict = {
        "setup_s": time.perf_counter() - STARTED,
        "params": sum(p.numel() for p in transformer.parameters()),
        "lora_layers": len(lora_targets(transformer)),
    }
    print(f"transformer on {device} after {results['setup_s']:.0f} s", file=sys.stderr, flush=True)
    results["rendering"] = measure_rendering(transformer, args, device)
    results["pack"] = {"bmm, checkpointing": sweep(transformer, "bmm", True, args, device)}
    results["grouped_vs_bmm"] = grouped_matches_bmm(transformer, args, device)
    print(f"  grouped against bmm: {results['grouped_vs_bmm']}", file=sys.stderr, flush=True)
    results["pack"]["grouped, checkpointing"] = sweep(transformer, "grouped", True, args, device)
    results["pack"]["bmm, no checkpointing"] = sweep(transformer, "bmm", False, args, device)
    results["stock"] = measure_stock(transformer, args, device)
    return results


# -- report --------------------------------------------------------------------------------------------------------


def per_hour(s_per_step: float, k: int, s_per_image: float | None, args) -> float | None:
    if s_per_image is None:
        return None
    return (3600 - args.class_images * s_per_image) / (args.train_steps * s_per_step / k + args.images * s_per_image)


def training_rows(results: dict, args) -> list[dict]:
    s_image = results["rendering"].get("s_per_image")
    stock = results["stock"] if "skipped" not in results["stock"] else {"checkpointing": results["stock"]}
    rows = [{"variant": f"stock peft loop, {name}", **r} for name, r in stock.items()]
    rows += [{"variant": f"pack, {name}", **r} for name, sweep_rows in results["pack"].items() for r in sweep_rows]
    for row in rows:
        if "s_per_step" in row:
            row["s_per_subject_step"] = row["s_per_step"] / row["k"]
            row["subjects_per_hour"] = per_hour(row["s_per_step"], row["k"], s_image, args)
    return rows


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_tables(info: dict, results: dict, rows: list[dict], args) -> None:
    for key, value in info.items():
        print(f"{key}: {value}")
    r = results["rendering"]
    print(f"\nrendering: {fmt(r.get('s_per_pass'), '.4f')} s per pass of {args.gen_batch} images -> "
          f"{fmt(r.get('s_per_image'), '.3f')} s per image at {args.gen_steps} steps; peak {fmt(r.get('peak_gb'), '.1f')} GB")
    print(f"grouped GEMMs against bmm (relative max difference): {results['grouped_vs_bmm']}")
    print(f"\nTraining (median s per step; subjects per GPU-hour = {args.train_steps} steps + {args.images} images "
          f"each, {args.class_images} shared class images an hour)\n")  # fmt: skip
    stock_rate = next((x.get("subjects_per_hour") for x in rows if x["variant"].startswith("stock")), None)
    print("| variant | K | s/step | s per subject-step | peak GB | subjects per GPU-hour | vs stock (checkpointing) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for x in rows:
        if "s_per_step" not in x:
            why = "out of memory" if x.get("oom") else x.get("skipped") or x.get("error")
            print(f"| {x['variant']} | {x.get('k', '')} | {why} |||||")
            continue
        rate = x["subjects_per_hour"]
        ratio = f"{rate / stock_rate:.2f}x" if rate and stock_rate else "n/a"
        print(f"| {x['variant']} | {x['k']} | {x['s_per_step']:.4f} | {x['s_per_subject_step']:.4f} "
              f"| {fmt(x['peak_gb'], '.1f')} | {fmt(rate, ',.1f')} | {ratio} |")  # fmt: skip


def describe(args, device: torch.device) -> dict:
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    return {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]), "device": name,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "model": "FLUX.1 [dev] transformer, tiny test shapes" if args.smoke else "FLUX.1 [dev] transformer shapes",
        "image_tokens": args.image_tokens, "text_tokens": args.text_tokens, "lora_rank": args.rank,
        "steps": args.steps, "warmup": args.warmup,
    }  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512, help="px: (resolution / 16)^2 image tokens")
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (FLUX.1 [dev]'s max_sequence_length)")
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--gen-steps", type=int, default=28, help="sampler steps per image (FLUX.1 [dev]'s default)")
    parser.add_argument("--train-steps", type=int, default=1000, help="the projection's steps per subject")
    parser.add_argument("--images", type=int, default=16, help="the projection's images per subject")
    parser.add_argument("--class-images", type=int, default=200, help="the projection's shared class set, per hour")
    parser.add_argument("--budget-s", type=float, default=420, help="skip what is left after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks that every path runs")
    args = parser.parse_args()
    if args.smoke:
        args.resolution, args.text_tokens, args.steps, args.warmup, args.gen_batch = 64, 8, 2, 1, 4
        torch.set_num_threads(1)  # CPU machines here are shared: more threads than free cores slow everything
    args.image_tokens = (args.resolution // 16) ** 2  # VAE /8, then FLUX's 2x2 packing
    return args


def main() -> None:
    args = parse_args()
    quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("no CUDA device: FLUX.1 [dev] shapes need a GPU; use --smoke to check the script on a CPU")
    results = run(args, device)
    info = describe(args, device)
    rows = training_rows(results, args)
    print_tables(info, results, rows, args)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_flux_train.json"
        path.write_text(json.dumps({**info, "results": results, "rows": rows}, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
