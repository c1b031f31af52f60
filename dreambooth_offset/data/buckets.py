"""Aspect-ratio buckets (kohya's --enable_bucket): every image trains at the size, about
`resolution**2` pixels, whose aspect ratio is nearest its own, and every batch comes from one
bucket. Pure functions: the bucket sizes, the bucket of an image, the crop a bucket takes out of a
stored image, and the order of each epoch's batches.

Sizes are (width, height) here, as kohya prints them; tensors are (C, H, W)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from dreambooth_offset.errors import UsageError


def bucket_sizes(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """kohya's bucket list: the square of side `resolution` rounded down to `step`, and for each
    width from `min_reso` to `max_reso` (in steps) the tallest height within the area, both
    ways round, heights kept within [min_reso, max_reso]; sorted."""
    area = resolution * resolution
    side = int(math.sqrt(area) // step * step)
    sizes = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (the first such in `sizes`)."""
    ratio = width / height
    return min(sizes, key=lambda s: abs(s[0] / s[1] - ratio))


def no_upscale_bucket(width: int, height: int, resolution: int, step: int, name: str) -> tuple[int, int]:
    """--bucket_no_upscale: a bucket of the image's own shape, never larger than it: scaled down to
    `resolution**2` pixels if larger, then each side rounded down to `step`. An image with a side
    under one step cannot be trained without upscaling: refused, naming it."""
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    w, h = int(width * scale) // step * step, int(height * scale) // step * step
    if w < step or h < step:
        raise UsageError(f"{name}: {width}x{height} is smaller than the smallest bucket ({step} px a side with "
                         "--bucket_reso_steps); with --bucket_no_upscale it is not enlarged. Remove it or drop "
                         "--bucket_no_upscale")
    return w, h


def crop_size(stored_hw: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the largest crop of a stored image with the bucket's aspect ratio; it is
    then resized to the bucket. Images are stored with their shorter side at `resolution` and a
    bucket's shorter side is at most that, so an image in its own bucket is only ever shrunk; a
    class image cropped to the instance batch's bucket of another shape may be enlarged."""
    h, w = stored_hw
    bw, bh = bucket
    if w * bh > h * bw:  # wider than the bucket: full height
        return h, min(w, round(h * bw / bh))
    return min(h, round(w * bh / bw)), w


def epoch_batches(buckets: Sequence[tuple[int, int]], batch_size: int, seed: int, stream: int,
                  epoch: int) -> list[list[int]]:
    """One epoch of batches over the slots 0..n-1 (`buckets[i]`: slot i's bucket): each bucket's
    slots in a random order cut into batches of `batch_size` (its last one may be shorter), then
    all batches in a random order. Seeded by (seed, stream, epoch), so a batch depends only on its
    position: resuming needs no sampler state."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + stream) * 1_000_033 + epoch) % 2**63)
    batches = []
    for bucket in sorted(set(buckets)):
        slots = [i for i, b in enumerate(buckets) if b == bucket]
        slots = [slots[j] for j in torch.randperm(len(slots), generator=g).tolist()]
        batches += [slots[k:k + batch_size] for k in range(0, len(slots), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def assign_buckets(sizes_hw: Sequence[tuple[int, int]], names: Sequence[object], data) -> list[tuple[int, int]]:
    """Each image's bucket from its original (height, width) (`data`: the run's DataConfig, its
    resolution resolved): the nearest of kohya's table, or with --bucket_no_upscale its own shape."""
    if data.bucket_no_upscale:
        return [no_upscale_bucket(w, h, data.resolution, data.bucket_reso_steps, str(name))
                for (h, w), name in zip(sizes_hw, names)]
    table = bucket_sizes(data.resolution, data.min_bucket_reso, data.max_bucket_reso, data.bucket_reso_steps)
    return [nearest_bucket(w, h, table) for h, w in sizes_hw]


def bucket_table(counts: dict[tuple[int, int], int]) -> str:
    """The bucket table printed at the start: size, aspect ratio, images."""
    lines = ["bucket      ratio  images"]
    lines += [f"{w:>4} x {h:<4} {w / h:5.2f}  {n}" for (w, h), n in sorted(counts.items())]
    return "\n".join(lines)


def bucket_info(buckets: Sequence[tuple[int, int]], sizes_hw: Sequence[tuple[int, int]],
                repeats: Sequence[int]) -> dict[str, object]:
    """kohya's `ss_bucket_info`: per bucket its size and its places (images times repeats), and
    the mean difference between an image's aspect ratio and its bucket's."""
    counts: dict[tuple[int, int], int] = {}
    for bucket, n in zip(buckets, repeats):
        counts[bucket] = counts.get(bucket, 0) + n
    errors = [abs(b[0] / b[1] - w / h) for b, (h, w) in zip(buckets, sizes_hw)]
    return {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))},
            "mean_img_ar_error": sum(errors) / len(errors)}
