"""Image files (or a dataset's bytes) to uint8 tensors: EXIF orientation honoured, any mode to
8-bit RGB, the shorter side resized to the resolution, an optional mask as a fourth channel; and
`ImageStore`, which keeps a source's files and decodes them only when a batch uses them."""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from dreambooth_offset.data.hf_dataset import EmbeddedImage


def open_image(image: Path | EmbeddedImage) -> Image.Image:
    """An image file, or an image a dataset holds as bytes, opened (not decoded) by Pillow."""
    return Image.open(io.BytesIO(image.data) if isinstance(image, EmbeddedImage) else image)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own conversion clips 16- and 32-bit greyscale at 255 (an almost white
    image), so those are scaled to 8 bits first (16-bit: / 257; float: [0, 1] -> [0, 255]);
    palette, greyscale, RGBA (alpha dropped), CMYK and 48-bit RGB go through Pillow."""
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        scale = 255.0 if img.mode == "F" else 1 / 257
        img = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def alpha_of(img: Image.Image) -> Image.Image:
    """An image's alpha channel (mode L), or all 255 when it has none."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").getchannel("A")
    return Image.new("L", img.size, 255)


def mask_from_file(path: Path, size: tuple[int, int]) -> Image.Image:
    """A mask image (white: trained, black: ignored) as mode L at `size` (the image's, as shown)."""
    with Image.open(path) as opened:
        mask = to_rgb(ImageOps.exif_transpose(opened)).convert("L")
    return mask if mask.size == size else mask.resize(size, Image.BILINEAR)


def resized_hw(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) of an image resized so that its shorter side is `resolution`."""
    scale = resolution / min(width, height)
    return max(resolution, round(height * scale)), max(resolution, round(width * scale))


def load_resized(paths: list[Path | EmbeddedImage], resolution: int,
                 masks: list[str | Path | None] | None = None) -> list[Tensor]:
    """Decode with `datasets`, honour EXIF orientation, convert to RGB, resize the shorter side to
    `resolution` (bilinear, as diffusers' scripts); uint8 tensors (3, H, W). With `masks` (per
    image: "alpha" for its alpha channel, a mask file, or None for all-ones) a fourth channel holds
    the mask, resized alike, so every crop, flip and bucket resize keeps it aligned."""
    import datasets

    cells = [{"path": None, "bytes": p.data} if isinstance(p, EmbeddedImage) else {"path": str(p), "bytes": None}
             for p in paths]
    feature = datasets.Image()  # the decoder a dataset's image column uses, without building a dataset per call
    out = []
    for cell in cells:
        shown = ImageOps.exif_transpose(feature.decode_example(cell))
        img = to_rgb(shown)
        size = resized_hw(img.height, img.width, resolution)[::-1]  # PIL's (width, height)
        tensor = torch.from_numpy(np.asarray(img.resize(size, Image.BILINEAR)).copy()).permute(2, 0, 1)
        if masks is not None:
            source = masks[len(out)]
            mask = (alpha_of(shown) if source == "alpha" else Image.new("L", img.size, 255) if source is None
                    else mask_from_file(Path(source), img.size))
            mask = torch.from_numpy(np.asarray(mask.resize(size, Image.BILINEAR)).copy())[None]
            tensor = torch.cat([tensor, mask])
        out.append(tensor)
    return out


class ImageStore(Sequence):
    """A source's images, decoded when a batch uses them (`load_resized`) rather than held for the
    run: only their files (or dataset bytes), mask sources and resized shapes stay in memory.
    `store[i]` is image i as `load_resized` gives it; `shape(i)` its (C, H, W) without decoding."""

    def __init__(self, paths: list, resolution: int, masks: list | None = None,
                 sizes: list[tuple[int, int]] | None = None):
        self.paths, self.resolution, self.masks = list(paths), resolution, masks
        channels = 3 if masks is None else 4
        self.shapes = [(channels, *resized_hw(h, w, resolution)) for h, w in (sizes or original_sizes(self.paths))]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return load_resized([self.paths[i]], self.resolution, None if self.masks is None else [self.masks[i]])[0]

    def shape(self, i: int) -> tuple[int, int, int]:
        return self.shapes[i]

    def select(self, indices) -> "ImageStore":
        """The images at `indices`, as a store."""
        store = ImageStore.__new__(ImageStore)
        store.paths, store.resolution = [self.paths[i] for i in indices], self.resolution
        store.masks = None if self.masks is None else [self.masks[i] for i in indices]
        store.shapes = [self.shapes[i] for i in indices]
        return store

    def rgb(self) -> "ImageStore":
        """The same images without their mask channel."""
        store = self.select(range(len(self)))
        store.masks, store.shapes = None, [(3, *s[1:]) for s in store.shapes]
        return store


def shape_of(images, i: int) -> tuple[int, ...]:
    """(C, H, W) of image i of a store or of a list of tensors."""
    return images.shape(i) if isinstance(images, ImageStore) else tuple(images[i].shape)


def original_sizes(paths: list[Path | EmbeddedImage]) -> list[tuple[int, int]]:
    """(height, width) of each image file as it is shown (EXIF orientation applied), read from its
    header: SDXL's `original_size` conditioning."""
    sizes = []
    for path in paths:
        with open_image(path) as img:
            width, height = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # the orientations that turn it by 90 degrees
                width, height = height, width
        sizes.append((height, width))
    return sizes
