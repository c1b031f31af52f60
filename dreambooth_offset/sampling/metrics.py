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


def hue_saturation_value(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """HSV of RGB images in [0, 1], (..., 3, H, W) -> three (..., H, W): hue in degrees [0, 360),
    saturation and value in [0, 1] (hue 0 where the pixel is grey)."""
    value, argmax = images.max(dim=-3)
    chroma = value - images.min(dim=-3).values
    r, g, b = images.unbind(dim=-3)
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(argmax == 0, ((g - b) / safe) % 6, torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue * 60.0, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    return hue, saturation, value


def colour_fraction(images: Tensor, hue: float, tolerance: float = 15.0, min_saturation: float = 0.4,
                    min_value: float = 0.05) -> Tensor:
    """Per-image fraction of pixels of one colour, whatever their brightness: hue within
    `tolerance` degrees of `hue`, saturated, not black. Shape (N,)."""
    h, s, v = hue_saturation_value(images)
    distance = torch.minimum((h - hue) % 360.0, (hue - h) % 360.0)
    return ((distance <= tolerance) & (s >= min_saturation) & (v >= min_value)).float().mean(dim=(-2, -1))


def contrast_map(images: Tensor) -> Tensor:
    """Per pixel, the RGB distance from the image's median colour (its background, where one colour
    covers most of it): (N, 3, H, W) -> (N, 1, H, W). Colour-blind and brightness-blind up to scale,
    so a shape keeps its map when a scene darkens or brightens it."""
    median = images.flatten(2).median(dim=2).values[..., None, None]
    return (images - median).pow(2).sum(dim=1, keepdim=True).sqrt()


def template_match(images: Tensor, templates: list[Tensor], min_variance: float = 1e-6) -> Tensor:
    """Per image, the highest normalised cross-correlation (Pearson's r; 0 when none is positive)
    between its contrast map and any of the odd-sided square `templates` at any position where the
    template fits: (N, 3, H, W) -> (N,). A window flatter than `min_variance` per pixel scores 0.
    The windowed variance is a sum of squares minus a squared sum; the map is centred on its own
    mean first (r does not change), so both terms scale with the image's variance and float32 loses
    digits only in windows far flatter than the image, which are the ones that score about 0."""
    import torch.nn.functional as F

    f = contrast_map(images.float())
    f = f - f.mean(dim=(2, 3), keepdim=True)
    best = torch.zeros(images.shape[0])
    for template in templates:
        t = template.float() - template.float().mean()
        k = t.shape[-1]
        ones = torch.ones(1, 1, k, k)
        total, squares = F.conv2d(f, ones), F.conv2d(f * f, ones)
        variance = (squares - total * total / k**2).clamp(min=0)
        r = F.conv2d(f, t[None, None]) / (variance.sqrt() * t.norm()).clamp(min=1e-30)
        r = torch.where(variance > min_variance * k**2, r, torch.zeros_like(r))
        best = torch.maximum(best, r.flatten(1).max(dim=1).values)
    return best
