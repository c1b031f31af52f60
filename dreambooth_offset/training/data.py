"""DreamBooth images: find and check them, read their captions, crop and flip them, assemble
instance || class batches (decoding and resizing: data/images.py).

Every random choice (which images,
crop offsets, flips) is drawn from the run's generator for the *global* batch (all processes),
and each process takes its own slice, so a run on 2 processes matches a run on 1 with twice the
batch.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from dreambooth_offset.data.buckets import crop_size
from dreambooth_offset.data.hf_dataset import EmbeddedImage
from dreambooth_offset.data.images import open_image, shape_of
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
    return [Example(source, i, *draw_crop(shape_of(images, i), (resolution, resolution), center_crop, random_flip,
                                          generator)) for i in indices]


def draw_crop(shape: tuple[int, ...], size: tuple[int, int], center_crop: bool, random_flip: bool,
              generator: torch.Generator) -> tuple[int, int, bool]:
    """(top, left, flip) of a crop of `size` (height, width) from an image of (C, H, W) `shape`:
    the centre, or random offsets drawn from `generator` (top, then left), then the flip."""
    (h, w), top, left = size, (shape[1] - size[0]) // 2, (shape[2] - size[1]) // 2
    if not center_crop:
        top = int(torch.randint(0, shape[1] - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, shape[2] - w + 1, (1,), generator=generator))
    return top, left, bool(torch.rand((), generator=generator) < 0.5) if random_flip else False


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
        size = crop_size(tuple(shape[1:]), bucket)
        examples.append(Example(source, i, *draw_crop(shape, size, center_crop, random_flip, generator), size,
                                (bucket[1], bucket[0])))
    return examples
