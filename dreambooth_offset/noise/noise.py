"""Training noise. Pure functions of (latents, config slice, generator); nothing here mutates its inputs.

Every random draw comes from the generator passed in, in a fixed order: the per-pixel noise
first (so offset 0 is exactly `randn`), then the per-batch draws (probability coin, random
strength), then the per-(sample, channel) offset. Formulas: docs/science.md, "Offset noise and its
variants"; every option with its source: docs/noise-options.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dreambooth_offset.config import NoiseConfig


def _device(latents: Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else latents.device


def offset_noise(latents: Tensor, offset: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise shaped like `latents` (B, C, H, W) plus one N(0, offset^2) shift per (B, C).

    Guttenberg, "Diffusion With Offset Noise" (Crosslabs, 2023); docs/science.md, "Offset noise and
    its variants": `randn(B, C, H, W) + offset * randn(B, C, 1, 1)`, the default of `sample_noise`.
    The per-pixel draw comes first, so with offset 0 the result is exactly `randn` for the same
    generator state. Drawn on the generator's device in fp32, then moved to the latents' device
    and dtype.
    """
    return sample_noise(latents, NoiseConfig(noise_offset=offset), generator)


def scheduled_offset(cfg: NoiseConfig, progress: float) -> float:
    """The offset strength at `progress` in [0, 1] through training (0 = first step, 1 = last).

    constant: noise_offset; linear: noise_offset -> noise_offset_end in a straight line; cosine:
    half a cosine from noise_offset to noise_offset_end (flat at both ends). docs/science.md,
    "Offset noise and its variants".
    """
    start = cfg.noise_offset
    if start is None or isinstance(start, str):
        raise ValueError(f"noise_offset = {start!r} must be resolved to a number first: 'auto' by "
                         "training/auto_offset.py, unset to the model family's default by training/family.py")
    if cfg.noise_offset_schedule == "constant":
        return start
    p = min(max(progress, 0.0), 1.0)
    end = cfg.noise_offset_end
    if cfg.noise_offset_schedule == "linear":
        return start + (end - start) * p
    if cfg.noise_offset_schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown noise_offset_schedule {cfg.noise_offset_schedule!r}")


def offset_strength(latents: Tensor, offset: float, cfg: NoiseConfig,
                    generator: torch.Generator | None = None) -> float | Tensor | None:
    """The offset strength this batch uses: a float, a (B, C, 1, 1) tensor (adaptive), or None (skipped).

    - noise_offset_probability p (SimpleTuner): one coin per batch; None when it says "no offset".
    - noise_offset_random_strength (kohya): `offset * U(0, 1)`, one draw per batch.
    - adaptive_noise_scale k (kohya): per (b, c) `clamp(offset + k * |mean_hw(latents)|, min=0)`.
    docs/science.md, "Offset noise and its variants".
    """
    device = _device(latents, generator)
    if cfg.noise_offset_probability < 1.0:
        if torch.rand((), generator=generator, device=device).item() >= cfg.noise_offset_probability:
            return None
    strength: float | Tensor = offset
    if cfg.noise_offset_random_strength:
        strength = offset * torch.rand((), generator=generator, device=device)
    if cfg.adaptive_noise_scale is not None:
        channel_mean = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().to(device)
        strength = (strength + cfg.adaptive_noise_scale * channel_mean).clamp(min=0.0)
    return strength


def pyramid_noise(latents: Tensor, iterations: int, discount: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Multi-resolution noise shaped like `latents`, scaled to unit standard deviation.

    Whitaker, "Multi-Resolution Noise for Diffusion Model Training" (2023; docs/science.md, "Offset
    noise and its variants"); kohya
    `--multires_noise_iterations/--multires_noise_discount`: `randn(B, C, H, W)` plus, for
    i = 1 .. iterations, `upsample_bilinear(randn(B, C, H / r^i, W / r^i)) * discount^i` with
    r ~ U(2, 4) per level, stopping once a side reaches 1; then divided by the result's std.
    (kohya's loop starts at i = 0, adding a second full-resolution draw; see docs/noise-options.md.)
    """
    b, c, h, w = latents.shape
    device = _device(latents, generator)
    noise = torch.randn((b, c, h, w), generator=generator, device=device)
    for i in range(1, iterations + 1):
        r = 2.0 + 2.0 * torch.rand((), generator=generator, device=device).item()
        hi, wi = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn((b, c, hi, wi), generator=generator, device=device)
        noise = noise + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hi == 1 or wi == 1:
            break
    return (noise / noise.std()).to(device=latents.device, dtype=latents.dtype)


def sample_noise(latents: Tensor, cfg: NoiseConfig, generator: torch.Generator | None = None,
                 progress: float = 0.0) -> Tensor:
    """The noise a training step adds to `latents` (B, C, H, W) and (for epsilon) regresses on.

    `progress` in [0, 1] is how far training is (for noise_offset_schedule). Draws, in this order:
    the per-pixel `randn(B, C, H, W)`, the per-batch draws of `offset_strength`, then the shift
    `randn(B, C, 1, 1)` times that strength (none when the offset is 0 and not adaptive), divided by
    sqrt(1 + strength^2) when variance preserving. Pyramid noise replaces all of it.
    """
    if cfg.multires_noise_iterations:
        return pyramid_noise(latents, cfg.multires_noise_iterations, cfg.multires_noise_discount, generator)
    offset = scheduled_offset(cfg, progress)
    b, c, h, w = latents.shape
    device = _device(latents, generator)
    noise = torch.randn((b, c, h, w), generator=generator, device=device)
    strength = offset_strength(latents, offset, cfg, generator) if offset or cfg.adaptive_noise_scale is not None else None
    if strength is not None:
        noise = noise + strength * torch.randn((b, c, 1, 1), generator=generator, device=device)
        if cfg.noise_offset_variance_preserving:
            # Var(randn + o * randn_bc) = 1 + o^2 per pixel; dividing restores the variance the
            # schedule assumes, so only the split between pixel and channel-mean noise changes.
            noise = noise / torch.sqrt(1.0 + torch.as_tensor(strength) ** 2)
    return noise.to(device=latents.device, dtype=latents.dtype)


def perturb_input_noise(noise: Tensor, cfg: NoiseConfig, generator: torch.Generator | None = None) -> Tensor:
    """The noise that builds the UNet's *input* under input perturbation; the target keeps `noise`.

    Ning et al., "Input Perturbation Reduces Exposure Bias in Diffusion Models" (2023; docs/science.md,
    "Offset noise and its variants"); kohya
    `--ip_noise_gamma g`: `noise + g * randn_like(noise)` (g scaled by U(0, 1) per batch with
    `--ip_noise_gamma_random_strength`). Returns `noise` itself when g is unset or 0.
    """
    if not cfg.ip_noise_gamma:
        return noise
    device = _device(noise, generator)
    gamma: float | Tensor = cfg.ip_noise_gamma
    if cfg.ip_noise_gamma_random_strength:
        gamma = gamma * torch.rand((), generator=generator, device=device)
    extra = gamma * torch.randn(noise.shape, generator=generator, device=device)
    return noise + extra.to(device=noise.device, dtype=noise.dtype)


def training_progress(step: int, max_train_steps: int) -> float:
    """0 at the first optimizer step, 1 at the last."""
    return step / max(max_train_steps - 1, 1)
