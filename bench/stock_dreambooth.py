"""The training step a user writes from diffusers' DreamBooth examples: every step redoes its reading and encoding.

Per step, as examples/dreambooth/train_dreambooth.py (full) and train_dreambooth_lora.py (LoRA) run with their
defaults (DataLoader with num_workers=0, no --pre_compute_text_embeddings): read one instance and one class image
from disk, resize and crop them, tokenize both prompts, encode the two images through the VAE and the two prompts
through the text encoder (one batch each: the scripts' collate_fn concatenates instance and class), noise, predict
under autocast, split the prior loss, clip, step AdamW, log the loss (a device sync).

Precision is the scripts': the VAE and the text encoder are cast to the mixed-precision dtype. In full mode the UNet
keeps fp32 master weights; in LoRA mode the frozen UNet is cast as well and the LoRA weights follow it (the LoRA
script upcasts them to fp32 only for fp16).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from engine.diffusion.train import make_optimizer
from engine.settings import Settings
from engine.diffusion.unet import UNetFamily


def load_example(path: str, resolution: int) -> torch.Tensor:
    """What DreamBoothDataset.__getitem__ does to one image: open, orient, resize the short side, centre-crop, scale."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


class StockDreamBooth:
    """One subject trained the stock way on its own copy of the model, loaded from `model_dir` as the scripts do."""

    def __init__(
        self,
        model_dir: Path,
        settings: Settings,
        instance_paths: list[str],
        class_paths: list[str],
        prompts: tuple[str, str],
        device: torch.device,
        seed: int,
    ):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        precision = settings.effective_mixed_precision(device.type)
        if precision == "fp16":
            raise ValueError("this baseline models bf16 and fp32 only, not fp16's loss scaling")
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.autocast = torch.autocast(device.type, dtype=self.dtype) if precision == "bf16" else nullcontext()
        self.settings, self.device = settings, device
        self.instance_paths, self.class_paths, self.prompts = instance_paths, class_paths, prompts
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        self.noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        self.vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
        self.vae.to(device, self.dtype).requires_grad_(False)
        self.text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
        self.text_encoder.to(device, self.dtype).requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        torch.manual_seed(seed)  # LoRA initialisation draws from the global RNG
        self.params = self._attach_trainable()
        self.optimizer = make_optimizer(self.params, settings, device)
        self.lr_scheduler = get_scheduler(
            settings.lr_scheduler, self.optimizer, num_warmup_steps=settings.lr_warmup_steps,
            num_training_steps=settings.max_train_steps,
        )  # fmt: skip
        self.generator = torch.Generator().manual_seed(seed)

    def _attach_trainable(self) -> list[torch.nn.Parameter]:
        settings = self.settings
        if settings.mode == "full":
            self.unet.to(self.device).requires_grad_(True)
        else:
            from peft import LoraConfig

            self.unet.to(self.device, self.dtype).requires_grad_(False)
            self.unet.add_adapter(
                LoraConfig(
                    r=settings.lora_rank,
                    lora_alpha=settings.effective_lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=list(settings.lora_target_modules or UNetFamily.lora_targets),
                )
            )
        self.unet.train()
        return [p for p in self.unet.parameters() if p.requires_grad]

    def _tokenize(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(
            prompt, truncation=True, padding="max_length", max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids  # fmt: skip

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One instance and one class example, read and tokenized now, as the DataLoader does each step."""
        i = int(torch.randint(len(self.instance_paths), (), generator=self.generator))
        j = int(torch.randint(len(self.class_paths), (), generator=self.generator))
        resolution = self.settings.resolution
        pixels = torch.stack([load_example(self.instance_paths[i], resolution),
                              load_example(self.class_paths[j], resolution)])  # fmt: skip
        input_ids = torch.cat([self._tokenize(self.prompts[0]), self._tokenize(self.prompts[1])])
        return pixels.to(self.device, self.dtype), input_ids.to(self.device)

    def step(self) -> float:
        """One optimisation step; returns the loss."""
        pixels, input_ids = self._batch()
        latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        embeddings = self.text_encoder(input_ids)[0]
        with self.autocast:
            prediction = self.unet(noisy, timesteps, embeddings, return_dict=False)[0]
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred_instance, pred_class = prediction.float().chunk(2)
        target_instance, target_class = target.float().chunk(2)
        loss = F.mse_loss(pred_instance, target_instance)
        loss = loss + self.settings.prior_loss_weight * F.mse_loss(pred_class, target_class)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)  # the scripts' default: --set_grads_to_none is off
        return loss.detach().item()
