"""A run's latent and text-encoder caches (--cache_latents, --cache_text_encoder_outputs and
their _to_disk forms); data/cache.py keeps the entries and names them by content."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from dreambooth_offset.data.cache import CACHE_FORMAT, TensorCache, default_cache_dir, digest, file_digest, module_digest
from dreambooth_offset.training.data import Example, draw_bucket_examples, draw_examples, stack_pixels
from dreambooth_offset.training.family import Conditioning, encode_prompts
from dreambooth_offset.training.models import latent_distribution


def cache_folder(data, what: str) -> Path:
    """`what`'s subfolder of --disk_cache_dir (`data`: the run's DataConfig)."""
    return Path(data.disk_cache_dir or default_cache_dir()) / what


def latent_mask(pixels: Tensor, latents: Tensor) -> Tensor:
    """--masked_loss: the rows' masks (channel 3 of `pixels`, cropped and flipped with the image,
    in [-1, 1]) as [0, 1] weights averaged down to the latent grid (kohya's 'area' resize)."""
    return torch.nn.functional.interpolate((pixels[:, 3:] + 1) / 2, size=tuple(latents.shape[2:]), mode="area")


def encode_rows(vae, examples: list[Example], images: dict, resolution: int, masked: bool) -> dict[str, Tensor]:
    """The rows' VAE posteriors ("mean", "std") and, when `masked`, their latent masks ("mask")."""
    pixels = stack_pixels(examples, images, resolution)
    with torch.no_grad():
        mean, std = latent_distribution(vae, pixels[:, :3])
    return {"mean": mean, "std": std, **({"mask": latent_mask(pixels, mean)} if masked else {})}


class LatentCache:
    """Each (image, crop, flip)'s posterior, computed once. In memory the key is the row itself
    (the run's images do not change under it); on disk it is the digest of the image file's bytes,
    its mask's, the VAE's weights and dtype, the resolution, the crop and the flip."""

    def __init__(self, vae, images: dict, resolution: int, masked: bool, folder: Path | None = None):
        self.vae, self.images, self.resolution, self.masked = vae, images, resolution, masked
        self.device = vae.device  # where rows go: the VAE may be parked on the CPU once all are cached (offload.py)
        self.store = TensorCache(folder, ("mean", "std", "mask") if masked else ("mean", "std"))
        self.vae_id = None if folder is None else (module_digest(vae), str(vae.dtype))
        self.image_ids: dict[tuple[str, int], tuple[str, str]] = {}

    def key(self, e: Example):
        if self.store.folder is None:
            return e
        if (e.source, e.index) not in self.image_ids:
            store = self.images[e.source]
            mask = None if store.masks is None else store.masks[e.index]
            self.image_ids[e.source, e.index] = (file_digest(store.paths[e.index]),
                                                 mask if mask in (None, "alpha") else file_digest(mask))
        return digest(CACHE_FORMAT, self.vae_id, self.image_ids[e.source, e.index], self.resolution,
                      e.top, e.left, e.flip, e.crop, e.target)

    def __call__(self, examples: list[Example]) -> tuple[Tensor, Tensor, Tensor | None]:
        """(mean, std, mask or None) of the rows, on the training device; missing rows are encoded together."""
        keys = [self.key(e) for e in examples]
        entries = dict(zip(keys, (self.store.get(k) for k in keys)))
        missing = list(dict.fromkeys(k for k in keys if entries[k] is None))
        if missing:
            rows = encode_rows(self.vae, [examples[keys.index(k)] for k in missing], self.images, self.resolution,
                               self.masked)
            for i, k in enumerate(missing):
                entries[k] = {name: t[i] for name, t in rows.items()}
                self.store.put(k, entries[k])
        stacked = [torch.stack([entries[k][name] for k in keys]).to(self.device) for name in ("mean", "std")]
        mask = torch.stack([entries[k]["mask"] for k in keys]) if self.masked else None
        return stacked[0], stacked[1], mask

    def fill(self, examples: list[Example]) -> str:
        """Every row of `examples` cached before training (each encoded on its own, so an entry
        does not depend on which others were missing); what was read and built."""
        def make(i: int) -> dict[str, Tensor]:
            return {k: v[0] for k, v in encode_rows(self.vae, [examples[i]], self.images, self.resolution,
                                                    self.masked).items()}

        self.store.fill([self.key(e) for e in examples], make, "caching latents")
        return self.store.describe("latent")


def every_crop(images: dict, resolution: int, random_flip: bool, buckets: list | None = None) -> list[Example]:
    """The rows a run with fixed (centre) crops can ever draw: each image (and its mirror with
    --random_flip) at the resolution, or with `buckets` (each instance image's bucket) instance
    images at their own bucket and class images at every bucket an instance batch uses."""
    unused = torch.Generator()  # centre crops without flips draw nothing
    if buckets is None:
        rows = [e for src, imgs in images.items()
                for e in draw_examples(src, imgs, range(len(imgs)), resolution, True, False, unused)]
    else:
        rows = [e for i, b in enumerate(buckets)
                for e in draw_bucket_examples("instance", images["instance"], [i], b, True, False, unused)]
        if "class" in images:
            rows += [e for b in dict.fromkeys(buckets) for e in draw_bucket_examples(
                "class", images["class"], range(len(images["class"])), b, True, False, unused)]
    return [dataclasses.replace(e, flip=f) for e in rows for f in ((False, True) if random_flip else (False,))]


def cached_conditioning(text_encoders, input_ids: Tensor, folder: Path | None) -> tuple[Conditioning, str]:
    """Every caption's (row of `input_ids`) encoder output, each encoded on its own; on disk, keyed
    by its token ids and the encoders' weights and dtypes. Also what was read and built."""
    store = TensorCache(folder, ("context", "pooled") if len(text_encoders) > 1 else ("context",))
    encoders_id = None if folder is None else [(module_digest(t), str(t.dtype)) for t in text_encoders]
    keys = [i if folder is None else digest(CACHE_FORMAT, encoders_id, ids.tolist()) for i, ids in enumerate(input_ids)]

    def make(i: int) -> dict[str, Tensor]:
        with torch.no_grad():
            cond = encode_prompts(text_encoders, input_ids[i : i + 1])
        return {"context": cond.context[0], **({"pooled": cond.pooled[0]} if cond.pooled is not None else {})}

    store.fill(keys, make, "caching text-encoder outputs")
    report = store.describe("text-encoder")
    entries = [store.memory[k] if folder is None else store.get(k) for k in keys]
    pooled = torch.stack([e["pooled"] for e in entries]) if "pooled" in store.keys else None
    return Conditioning(torch.stack([e["context"] for e in entries]), pooled), report
