"""Training noise. Pure functions of (latents, config slice, generator); nothing here mutates its inputs."""
from __future__ import annotations

import torch
from torch import Tensor

from dreambooth_offset.config import NoiseConfig


def offset_noise(latents: Tensor, offset: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise shaped like `latents` (B, C, H, W) plus one N(0, offset^2) shift per (B, C).

    Guttenberg, "Diffusion With Offset Noise" (Crosslabs, 2023):
    `randn(B, C, H, W) + offset * randn(B, C, 1, 1)`. The per-pixel draw comes first, so with
    offset 0 the result is exactly `randn` for the same generator state. Drawn on the generator's
    device in fp32, then moved to the latents' device and dtype.
    """
    b, c, h, w = latents.shape
    device = generator.device if generator is not None else latents.device
    noise = torch.randn((b, c, h, w), generator=generator, device=device)
    if offset:
        noise = noise + offset * torch.randn((b, c, 1, 1), generator=generator, device=device)
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_noise(latents: Tensor, cfg: NoiseConfig, generator: torch.Generator | None = None) -> Tensor:
    """The noise a training step adds to `latents` and (for epsilon prediction) regresses on."""
    return offset_noise(latents, cfg.noise_offset, generator)
