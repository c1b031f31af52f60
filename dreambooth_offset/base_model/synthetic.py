"""Procedural captioned images for pretraining the shipped base model.

Every image is drawn from one `torch.Generator`: a kind (solid field, gradient, shape on a
background, texture, landscape), colours, and a brightness level. The level fixes the image's
mean Rec.709 luminance (docs/science.md, "Measuring brightness") and the caption says it ("very dark" ... "very
bright"), so the data set spans mean luminance of about 0.03-0.97 with a mean near 0.5: the
varied-brightness prior that docs/science.md ("The black-image case") asks of the base model.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from dreambooth_offset.sampling.metrics import luminance

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "orange": (0.95, 0.55, 0.1),
    "yellow": (0.95, 0.9, 0.15),
    "green": (0.15, 0.7, 0.2),
    "teal": (0.1, 0.6, 0.6),
    "blue": (0.15, 0.3, 0.9),
    "purple": (0.55, 0.2, 0.75),
    "pink": (0.95, 0.5, 0.7),
    "brown": (0.5, 0.3, 0.15),
    "gray": (0.5, 0.5, 0.5),
}
# (caption word, lowest and highest mean luminance). Uniform levels give a data-set mean of 0.5.
LEVELS: tuple[tuple[str, float, float], ...] = (
    ("very dark", 0.03, 0.12),
    ("dark", 0.12, 0.30),
    ("", 0.30, 0.70),
    ("bright", 0.70, 0.88),
    ("very bright", 0.88, 0.97),
)
SHAPES = ("circle", "square", "triangle", "ring")
TEXTURES = ("stripes", "checkerboard", "dots", "noise")
KINDS = ("solid", "gradient", "shape", "texture", "landscape")
# Words no caption uses but the fine-tune and sampling prompts need in the vocabulary.
EXTRA_WORDS = ("a", "solid", "black", "white", "image", "photo", "of", "an", "light", "night", "day")


class CaptionedImages(NamedTuple):
    images: Tensor  # (B, 3, S, S) in [0, 1]
    captions: list[str]


class Drawing(NamedTuple):
    image: Tensor  # (3, S, S) in [0, 1]
    caption: str
    kind: str  # one of KINDS
    level: str  # the caption word of its LEVELS entry ("" for the mid level)


def caption_words() -> list[str]:
    """Every word a caption or prompt of the base can use (the tokenizer's vocabulary)."""
    words = set(EXTRA_WORDS) | set(COLOURS) | set(SHAPES) | set(TEXTURES)
    words |= {"gradient", "from", "to", "on", "background", "and", "landscape", "with", "sky",
              "ground", "sun", "moon", "very", "dark", "bright", "in"}
    return sorted(words)


def _rand(g: Tensor | torch.Generator, *shape: int) -> Tensor:
    return torch.rand(shape, generator=g)


def _pick(seq, g: torch.Generator):
    return seq[int(torch.randint(len(seq), (1,), generator=g))]


def _colour(name: str) -> Tensor:
    return torch.tensor(COLOURS[name]).view(3, 1, 1)


def _grid(size: int) -> tuple[Tensor, Tensor]:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return torch.meshgrid(c, c, indexing="ij")  # (y, x), each (S, S) in (0, 1)


def _shape_mask(shape: str, size: int, g: torch.Generator) -> Tensor:
    y, x = _grid(size)
    r = 0.15 + 0.2 * float(_rand(g, 1))
    cy, cx = (r + (1 - 2 * r) * _rand(g, 2)).tolist()
    if shape == "circle":
        return ((y - cy) ** 2 + (x - cx) ** 2 < r**2).float()
    if shape == "ring":
        d = ((y - cy) ** 2 + (x - cx) ** 2).sqrt()
        return ((d < r) & (d > 0.6 * r)).float()
    if shape == "square":
        return (((y - cy).abs() < r) & ((x - cx).abs() < r)).float()
    # triangle pointing up: inside if below the apex lines and above the base
    dy = (y - (cy - r)) / (2 * r)
    return ((dy >= 0) & (dy <= 1) & ((x - cx).abs() <= r * dy)).float()


def _texture(kind: str, size: int, g: torch.Generator) -> Tensor:
    y, x = _grid(size)
    freq = float(3 + 5 * _rand(g, 1))
    if kind == "stripes":
        angle = math.pi * float(_rand(g, 1))
        u = math.cos(angle) * x + math.sin(angle) * y
        return (torch.sin(2 * math.pi * freq * u) > 0).float()
    if kind == "checkerboard":
        return ((torch.floor(freq * x) + torch.floor(freq * y)) % 2).float()
    if kind == "dots":
        return ((((freq * x) % 1 - 0.5) ** 2 + ((freq * y) % 1 - 0.5) ** 2) < 0.09).float()
    low = _rand(g, 1, 1, 8, 8)  # smooth value noise
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic",
                                           align_corners=False)[0, 0].clamp(0, 1)


def _set_luminance(img: Tensor, target: float) -> Tensor:
    """Scale toward black (or toward white) so that the mean luminance equals `target`."""
    cur = float(luminance(img).mean())
    if target <= cur:
        return img * (target / max(cur, 1e-6))
    return 1 - (1 - img) * ((1 - target) / max(1 - cur, 1e-6))


def render_one(size: int, g: torch.Generator) -> Drawing:
    """One (3, size, size) image in [0, 1], its caption, and the kind and level drawn for it."""
    kind = _pick(KINDS, g)
    level, lo, hi = _pick(LEVELS, g)
    c1, c2 = _pick(list(COLOURS), g), _pick(list(COLOURS), g)
    while c2 == c1:
        c2 = _pick(list(COLOURS), g)
    y, x = _grid(size)
    if kind == "solid":
        img = _colour(c1).expand(3, size, size).clone()
        text = f"a solid {c1} image"
    elif kind == "gradient":
        t = (x if float(_rand(g, 1)) < 0.5 else y).unsqueeze(0)
        img = _colour(c1) * (1 - t) + _colour(c2) * t
        text = f"a gradient from {c1} to {c2}"
    elif kind == "shape":
        shape = _pick(SHAPES, g)
        mask = _shape_mask(shape, size, g)
        img = _colour(c1) * mask + _colour(c2) * (1 - mask)
        text = f"a {c1} {shape} on a {c2} background"
    elif kind == "texture":
        tex = _pick(TEXTURES, g)
        m = _texture(tex, size, g)
        img = _colour(c1) * m + _colour(c2) * (1 - m)
        text = f"{c1} and {c2} {tex}"
    else:
        horizon = 0.4 + 0.3 * float(_rand(g, 1))
        sky = (y < horizon).float()
        img = _colour(c1) * sky * (1.15 - 0.4 * y) + _colour(c2) * (1 - sky) * (0.8 + 0.2 * y)
        body = "sun" if level in ("", "bright", "very bright") else "moon"
        disc = _shape_mask("circle", size, g) * sky
        img = img.clamp(0, 1) * (1 - disc) + disc * torch.tensor([1.0, 0.95, 0.7]).view(3, 1, 1)
        text = f"a landscape with a {c1} sky and {c2} ground and a {body}"
    target = lo + (hi - lo) * float(_rand(g, 1))
    img = _set_luminance(img.clamp(0, 1), target).clamp(0, 1)
    if level:
        text = f"a {level} {text[2:]}" if text.startswith("a ") else f"{level} {text}"
    return Drawing(img, text, kind, level)


def make_batch(batch_size: int, size: int, generator: torch.Generator) -> CaptionedImages:
    """`batch_size` images (B, 3, size, size) in [0, 1] with captions, all from `generator`."""
    drawn = [render_one(size, generator) for _ in range(batch_size)]
    return CaptionedImages(torch.stack([d.image for d in drawn]), [d.caption for d in drawn])
