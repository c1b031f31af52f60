"""Brightness of images: Rec. 709 luminance and the fractions of dark and bright pixels
(docs/science.md, "Measuring brightness"). Pure tensor functions."""
from __future__ import annotations

import torch
from torch import Tensor

DARK_THRESHOLD = 0.05
BRIGHT_THRESHOLD = 0.95


def luminance(images: Tensor) -> Tensor:
    """Rec. 709 luma Y = 0.2126 R + 0.7152 G + 0.0722 B of RGB images in [0, 1]: (..., 3, H, W) -> (..., H, W)."""
    weights = torch.tensor([0.2126, 0.7152, 0.0722], dtype=images.dtype, device=images.device)
    return (images * weights.view(3, 1, 1)).sum(dim=-3)


def mean_luminance(images: Tensor) -> Tensor:
    """Per-image mean luminance in [0, 1], shape (N,)."""
    return luminance(images).mean(dim=(1, 2))


def dark_fraction(images: Tensor, threshold: float = DARK_THRESHOLD) -> Tensor:
    """Per-image fraction of pixels with luminance below `threshold`, shape (N,)."""
    return (luminance(images) < threshold).float().mean(dim=(1, 2))


def bright_fraction(images: Tensor, threshold: float = BRIGHT_THRESHOLD) -> Tensor:
    return (luminance(images) > threshold).float().mean(dim=(1, 2))
