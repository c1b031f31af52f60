"""`--noise_offset auto`: the smallest offset that closes the train/inference brightness gap.

docs/science.md, "The leak": at t = T a training input's channel mean is `a_T * m +- s_T * sqrt(1/N + o^2)`,
while inference starts from noise with channel mean `0 +- 1/sqrt(N)`. Their distance in noise
standard deviations is `z = a_T * |m| / (s_T * sqrt(1/N + o^2))`. A model can only learn to move
the brightness when its start does not give it away, so `auto` picks the smallest `o` with
`z <= 1` for the most extreme (image, channel) latent mean `m` of the training images.
`auto_offset` is the formula (pure); training/auto_offset.py measures `m` and applies it to a run.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

# 0.3 closes the gap for |m| up to 4.4 at any latent size with SD's schedule (as N grows,
# z -> a_T * |m| / (s_T * o), a_T / s_T = 0.0684): over four times the leak of a solid black image
# (|m| about 1). Beyond it every pixel's noise variance is 1.09 and the channel mean carries
# o^2 / (1 + o^2) = 8 % of the epsilon loss, 8x the share at o = 0.1 and far past published
# settings (SDXL 0.05, Crosslabs 0.1). Reaching the cap means unusual data or schedule; the
# record says `capped` and z_after stays above 1.
AUTO_CAP = 0.3


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
    """z = a_T * |m| / (s_T * sqrt(1/N + o^2)): train/inference start distance in noise stds
    (docs/science.md, "The leak")."""
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


def describe(result: AutoOffset) -> str:
    """One log line: the chosen value and the gap before and after."""
    note = f" (capped at {result.cap}: the gap stays above 1)" if result.capped else ""
    return (f"noise_offset auto: {result.offset:.4f}{note}; worst latent channel mean {result.worst_channel_mean:+.3f}, "
            f"N = {result.latent_pixels}, a_T = {result.a_T:.4f}: gap z {result.z_before:.2f} -> {result.z_after:.2f}")


def metadata(result: AutoOffset | None) -> dict[str, object]:
    """`noise_offset_auto` for the WebUI metadata (`ss_noise_offset_auto`); empty when not auto."""
    if result is None:
        return {}
    keys = ("z_before", "z_after", "worst_channel_mean", "latent_pixels", "cap", "capped")
    return {"noise_offset_auto": {k: getattr(result, k) for k in keys}}
