"""`--noise_offset auto`: the smallest offset that closes the train/inference brightness gap.

SCIENCE.md section 2: at t = T a training input's channel mean is `a_T * m +- s_T * sqrt(1/N + o^2)`,
while inference starts from noise with channel mean `0 +- 1/sqrt(N)`. Their distance in noise
standard deviations is `z = a_T * |m| / (s_T * sqrt(1/N + o^2))`. A model can only learn to move
the brightness when its start does not give it away, so `auto` picks the smallest `o` with
`z <= 1` for the most extreme (image, channel) latent mean `m` of the training images.
`auto_offset` is the formula (pure); `latent_channel_means` measures `m`; `resolve_auto_offset`
puts the two together for a run.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from dreambooth_offset.config import RunConfig

# 0.3 closes the gap for |m| up to 4.4 at any latent size with SD's schedule (as N grows,
# z -> a_T * |m| / (s_T * o), a_T / s_T = 0.0684): over four times the leak of a solid black image
# (|m| about 1). Beyond it every pixel's noise variance is 1.09 and the channel mean carries
# o^2 / (1 + o^2) = 8 % of the epsilon loss, 8x the share at o = 0.1 and far past published
# settings (SDXL 0.05, Crosslabs 0.1). Reaching the cap means unusual data or schedule; the
# record says `capped` and z_after stays above 1.
AUTO_CAP = 0.3
RECORD_NAME = "noise_offset_auto.json"
# Options that only modify the offset; they are no-ops when auto resolves to 0 and are reset then.
_OFFSET_MODIFIERS = {"noise_offset_random_strength": False, "adaptive_noise_scale": None,
                     "noise_offset_probability": 1.0, "noise_offset_variance_preserving": False}


class AutoOffset(NamedTuple):
    offset: float  # the chosen o
    z_before: float  # gap of the worst channel mean with o = 0
    z_after: float  # gap with the chosen o (1.0 unless capped or no offset was needed)
    worst_channel_mean: float  # the (image, channel) latent mean of largest magnitude, signed
    latent_pixels: int  # N = latent H * W
    a_T: float  # sqrt(alphas_cumprod[-1])
    s_T: float  # sqrt(1 - alphas_cumprod[-1])
    cap: float
    capped: bool


def leak_gap(channel_mean: float, latent_pixels: int, a_T: float, s_T: float, offset: float) -> float:
    """z = a_T * |m| / (s_T * sqrt(1/N + o^2)): train/inference start distance in noise stds."""
    return a_T * abs(channel_mean) / (s_T * math.sqrt(1.0 / latent_pixels + offset**2))


def auto_offset(channel_means: Tensor, latent_pixels: int, a_T: float, s_T: float, cap: float = AUTO_CAP) -> AutoOffset:
    """Smallest o with z <= 1 for the most extreme entry of `channel_means` (any shape), capped.

    z <= 1  <=>  o^2 >= (a_T * |m| / s_T)^2 - 1/N, so o = sqrt(max(0, (a_T |m| / s_T)^2 - 1/N)).
    """
    flat = channel_means.detach().float().flatten()
    worst = float(flat[flat.abs().argmax()]) if flat.numel() else 0.0
    needed = math.sqrt(max(0.0, (a_T * abs(worst) / s_T) ** 2 - 1.0 / latent_pixels))
    offset = min(needed, cap)
    return AutoOffset(offset, leak_gap(worst, latent_pixels, a_T, s_T, 0.0),
                      leak_gap(worst, latent_pixels, a_T, s_T, offset), worst, latent_pixels,
                      a_T, s_T, cap, needed > cap)


@torch.no_grad()
def latent_channel_means(vae, images: list[Tensor], resolution: int, batch_size: int = 8) -> tuple[Tensor, int]:
    """((num_images, C) channel means, N): the VAE posterior means of the centre crops of uint8
    (3, H, W) `images`, scaled as training scales latents, averaged over H, W; N = latent H * W."""
    from dreambooth_offset.data import center_offsets, to_pixels
    from dreambooth_offset.models import latent_distribution, scale_latents

    means, pixels = [], 0
    for i in range(0, len(images), batch_size):
        crops = [to_pixels(img, *center_offsets(img, resolution), False, resolution) for img in images[i : i + batch_size]]
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
        changes.update(_OFFSET_MODIFIERS)  # nothing to modify: keep the config valid and truthful
    return dataclasses.replace(cfg, noise=dataclasses.replace(cfg.noise, **changes)), result, means


def describe(result: AutoOffset) -> str:
    """One log line: the chosen value and the gap before and after."""
    note = f" (capped at {result.cap}: the gap stays above 1)" if result.capped else ""
    return (f"noise_offset auto: {result.offset:.4f}{note}; worst latent channel mean {result.worst_channel_mean:+.3f}, "
            f"N = {result.latent_pixels}, a_T = {result.a_T:.4f}: gap z {result.z_before:.2f} -> {result.z_after:.2f}")


def write_record(path: str | Path, result: AutoOffset, channel_means: Tensor) -> None:
    record = {**result._asdict(), "channel_means": [[round(v, 6) for v in row] for row in channel_means.tolist()]}
    Path(path).write_text(json.dumps(record, indent=2) + "\n")


def metadata(result: AutoOffset | None) -> dict[str, object]:
    """`noise_offset_auto` for the WebUI metadata (`ss_noise_offset_auto`); empty when not auto."""
    if result is None:
        return {}
    keys = ("z_before", "z_after", "worst_channel_mean", "latent_pixels", "cap", "capped")
    return {"noise_offset_auto": {k: getattr(result, k) for k in keys}}
