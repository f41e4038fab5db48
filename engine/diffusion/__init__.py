"""DreamBooth on diffusion bases: the base model, instance data, class-prior images, the training loop, packed LoRA
slots, checkpoints, weight export and generation. Imports torch, diffusers, transformers and engine's cross-cutting
modules (settings, storage, hub, tiny); never Ray, never engine.vlm."""
