"""`--noise_offset auto` for a run: measure the training images' latent channel means, then pick
the offset with noise/auto.py's formula and record the choice beside the LoRA."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import Tensor

from dreambooth_offset.config import RunConfig
from dreambooth_offset.config.noise import OFFSET_MODIFIERS
from dreambooth_offset.noise.auto import AutoOffset, auto_offset
from dreambooth_offset.training.data import center_offsets, to_pixels
from dreambooth_offset.training.models import latent_distribution, scale_latents

RECORD_NAME = "noise_offset_auto.json"


@torch.no_grad()
def latent_channel_means(vae, images: list[Tensor], resolution: int, batch_size: int = 8) -> tuple[Tensor, int]:
    """((num_images, C) channel means, N): the VAE posterior means of the centre crops of uint8
    (3, H, W) `images`, scaled as training scales latents, averaged over H, W; N = latent H * W."""
    means, pixels = [], 0
    for i in range(0, len(images), batch_size):
        crops = [to_pixels(img, *center_offsets(img.shape, resolution), False, resolution) for img in images[i : i + batch_size]]
        mean, _ = latent_distribution(vae, torch.stack(crops))
        latents = scale_latents(mean, vae.config)
        means.append(latents.mean(dim=(2, 3)).cpu())
        pixels = latents.shape[2] * latents.shape[3]
    return torch.cat(means), pixels


def resolve_auto_offset(cfg: RunConfig, vae, noise_scheduler, images: dict[str, list[Tensor]]
                        ) -> tuple[RunConfig, AutoOffset | None, Tensor | None]:
    """(cfg with noise_offset = 'auto' replaced by its value, the AutoOffset, the channel means);
    cfg unchanged and None, None when noise_offset is a number. `images`: source -> uint8 images."""
    if cfg.noise.noise_offset != "auto":
        return cfg, None, None
    parts = [latent_channel_means(vae, imgs, cfg.data.resolution) for imgs in images.values() if imgs]
    means = torch.cat([m for m, _ in parts])
    abar_T = float(noise_scheduler.alphas_cumprod[-1])
    result = auto_offset(means, parts[0][1], math.sqrt(abar_T), math.sqrt(1.0 - abar_T))
    changes: dict[str, object] = {"noise_offset": result.offset}
    if result.offset == 0.0 and not cfg.noise.noise_offset_end:
        changes.update(OFFSET_MODIFIERS)  # nothing to modify: keep the config valid and truthful
    return dataclasses.replace(cfg, noise=dataclasses.replace(cfg.noise, **changes)), result, means


def write_record(path: str | Path, result: AutoOffset, channel_means: Tensor) -> None:
    record = {**result._asdict(), "channel_means": [[round(v, 6) for v in row] for row in channel_means.tolist()]}
    Path(path).write_text(json.dumps(record, indent=2) + "\n")


