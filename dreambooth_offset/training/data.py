"""DreamBooth images: find and check them, resize, crop and flip, assemble instance || class batches.

Images are decoded through `datasets`' `Image` feature. Every random choice (which images,
crop offsets, flips) is drawn from the run's generator for the *global* batch (all processes),
and each process takes its own slice, so a run on 2 processes matches a run on 1 with twice the
batch.
"""
from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from dreambooth_offset.data.buckets import crop_size
from dreambooth_offset.data.hf_dataset import EmbeddedImage
from dreambooth_offset.errors import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Files that may sit beside images without being images (kohya-style captions, notes).
SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".jsonl", ".md", ".toml", ".npz"}


def find_images(folder: str | Path, flag: str, allow_empty: bool = False, caption_extension: str = "") -> list[Path]:
    """Every image file in `folder` (not recursive), sorted. A file that cannot be used raises,
    naming it: unreadable, empty, truncated, over Pillow's decompression-bomb limit, a symbolic
    link that loops or leads nowhere, or neither an image nor a sidecar (a known suffix, or
    `caption_extension`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--{flag} {folder}: folder does not exist")
    paths = []
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if path.is_symlink() and not path.exists():  # exists() follows the link: False for a loop or a dangling one
            raise UsageError(f"{path}: a symbolic link that loops or leads nowhere; remove it or point it at an image")
        if not path.is_file():
            continue
        if path.suffix.lower() in SIDECAR_SUFFIXES or (caption_extension and path.name.endswith(caption_extension)):
            continue
        check_image(path)
        paths.append(path)
    if not paths and not allow_empty:
        raise UsageError(f"--{flag} {folder}: no images found")
    return paths


def open_image(image: Path | EmbeddedImage) -> Image.Image:
    """An image file, or an image a dataset holds as bytes, opened (not decoded) by Pillow."""
    return Image.open(io.BytesIO(image.data) if isinstance(image, EmbeddedImage) else image)


def check_image(path: Path | EmbeddedImage) -> None:
    """Decode `path` fully (truncated files pass a header check) or raise naming it."""
    if (len(path.data) if isinstance(path, EmbeddedImage) else path.stat().st_size) == 0:
        raise UsageError(f"{path}: an empty file (0 bytes), not an image; remove it or replace it")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; such a file would still take
            # gigabytes to decode, so it is refused like the larger ones Pillow refuses itself.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(path) as img:
                img.load()
                frames = getattr(img, "n_frames", 1)
        if frames > 1:
            print(f"warning: {path} has {frames} frames (an animation); training uses the first", file=sys.stderr)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UsageError(f"{path}: too many pixels to decode safely ({err}); resize it first") from None
    except PermissionError as err:
        raise UsageError(f"{path}: cannot read it ({err.strerror}); check its permissions") from None
    except Exception as err:  # PIL raises many types; any of them means "not a usable image"
        raise UsageError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def read_captions(paths: list[Path], extension: str, prompt: str) -> list[str]:
    """Each image's caption: its sidecar `<stem><extension>` file's text when there is one (and
    `extension` is set), otherwise the folder's `prompt`."""
    captions = []
    for path in paths:
        sidecar = path.with_suffix(extension) if extension else None
        if sidecar is not None and sidecar.is_file():
            try:
                captions.append(sidecar.read_text(encoding="utf-8").strip())
            except UnicodeDecodeError:
                raise UsageError(f"caption file {sidecar}: not UTF-8 text") from None
        else:
            captions.append(prompt)
    return captions


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


def crop_top_left(example: Example, width: int, resolution: int) -> tuple[int, int]:
    """Where the crop of `example` starts in its resized image of `width` pixels, as SDXL's
    conditioning counts it: diffusers' SDXL scripts flip before cropping, so a flipped crop's left
    edge is measured in the mirrored image."""
    crop_width = resolution if example.crop is None else example.crop[1]
    left = width - example.left - crop_width if example.flip else example.left
    if example.crop is None:
        return example.top, left
    scale = example.target[1] / crop_width  # a bucket's crop is resized to the bucket: count in that scale
    return round(example.top * scale), round(left * scale)


def crop_is_random(images, resolution: int, center_crop: bool) -> bool:
    return not center_crop and any(shape_of(images, i)[1:] != (resolution, resolution) for i in range(len(images)))


def to_pixels(img: Tensor, top: int, left: int, flip: bool, resolution: int) -> Tensor:
    """Crop a uint8 (3, H, W) image, optionally mirror it, and map to float [-1, 1]."""
    crop = img[:, top : top + resolution, left : left + resolution]
    if flip:
        crop = crop.flip(-1)
    return crop.float() / 127.5 - 1.0


def center_offsets(shape: tuple[int, ...], resolution: int) -> tuple[int, int]:
    """The centre crop's (top, left) in an image of (C, H, W) `shape`."""
    return (shape[1] - resolution) // 2, (shape[2] - resolution) // 2


@dataclass(frozen=True)
class Example:
    """One row of a batch: which image of which set, and how it was cropped and flipped."""

    source: str  # "instance" or "class"
    index: int
    top: int
    left: int
    flip: bool
    crop: tuple[int, int] | None = None  # buckets: (height, width) of the crop, resized to `target`
    target: tuple[int, int] | None = None  # buckets: the (height, width) the row trains at


def epoch_indices(n: int, start: int, count: int, seed: int, stream: int) -> list[int]:
    """Items `start .. start+count` of an endless sequence of shuffled epochs over `n` items.

    Each epoch's permutation comes from a generator seeded with (seed, stream, epoch), so the
    sequence depends only on the position: resuming at any step needs no sampler state.
    """
    out = []
    for k in range(start, start + count):
        epoch, pos = divmod(k, n)
        g = torch.Generator().manual_seed(((seed * 1_000_003 + stream) * 1_000_033 + epoch) % 2**63)
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return out


def draw_examples(
    source: str,
    images: list[Tensor],
    indices: list[int],
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    generator: torch.Generator,
) -> list[Example]:
    """Crop offsets and flips for the chosen images, drawn from `generator` in a fixed order."""
    examples = []
    for i in indices:
        shape = shape_of(images, i)
        top, left = center_offsets(shape, resolution)
        if not center_crop:
            top = int(torch.randint(0, shape[1] - resolution + 1, (1,), generator=generator))
            left = int(torch.randint(0, shape[2] - resolution + 1, (1,), generator=generator))
        flip = bool(torch.rand((), generator=generator) < 0.5) if random_flip else False
        examples.append(Example(source, i, top, left, flip))
    return examples


def stack_pixels(examples: list[Example], sets: dict[str, list[Tensor]], resolution: int) -> Tensor:
    return torch.stack([to_pixels(sets[e.source][e.index], e.top, e.left, e.flip, resolution) if e.crop is None
                        else bucket_pixels(sets[e.source][e.index], e) for e in examples])


def bucket_pixels(img: Tensor, e: Example) -> Tensor:
    """A bucket row: the crop, mirrored if drawn so, resized to the bucket (bilinear with
    antialiasing: it only ever shrinks, data/buckets.py), mapped to [-1, 1]."""
    (h, w), target = e.crop, e.target
    crop = img[:, e.top : e.top + h, e.left : e.left + w].float()
    if e.flip:
        crop = crop.flip(-1)
    if (h, w) != target:
        crop = torch.nn.functional.interpolate(crop[None], size=target, mode="bilinear", antialias=True,
                                               align_corners=False)[0]
    return crop / 127.5 - 1.0


def draw_bucket_examples(source: str, images: list[Tensor], indices: list[int], bucket: tuple[int, int],
                         center_crop: bool, random_flip: bool, generator: torch.Generator) -> list[Example]:
    """As draw_examples, for a batch trained at `bucket` (width, height): each image's largest crop
    of the bucket's aspect ratio, at a random (or the centre) offset."""
    examples = []
    for i in indices:
        shape = shape_of(images, i)
        h, w = crop_size(tuple(shape[1:]), bucket)
        top, left = (shape[1] - h) // 2, (shape[2] - w) // 2
        if not center_crop:
            top = int(torch.randint(0, shape[1] - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, shape[2] - w + 1, (1,), generator=generator))
        flip = bool(torch.rand((), generator=generator) < 0.5) if random_flip else False
        examples.append(Example(source, i, top, left, flip, (h, w), (bucket[1], bucket[0])))
    return examples
