"""Training batches: instance rows, then class rows, as latents plus the text conditioning.

When cropping is deterministic (center crop, or images already square at the resolution), each
(image, flip) is encoded by the VAE once and its posterior (mean, std) is kept; every step then
draws a fresh posterior sample from the run's generator. The draws are the same as when encoding
every step, so caching changes speed, not results. --cache_latents encodes every row before the
first step (and refuses random crops); --cache_latents_to_disk keeps the entries on disk
(training/caching.py); --cache_text_encoder_outputs(_to_disk) likewise for the captions.

An image with N repeats (kohya's `N_name` folders) holds N places in every epoch. Fixed captions
are tokenized (and, with frozen text encoders, encoded) once; with a random caption option
(--shuffle_caption, --caption_dropout_rate, --caption_tag_dropout_rate) each row's caption is
made from the run's generator after its latents are drawn, and encoded in the step.
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch
from torch import Tensor

from dreambooth_offset.config import DataConfig
from dreambooth_offset.errors import UsageError
from dreambooth_offset.data.captions import CaptionPolicy, apply_policy, caption_policy
from dreambooth_offset.data.images import shape_of
from dreambooth_offset.data.buckets import epoch_batches
from dreambooth_offset.training.caching import LatentCache, cache_folder, cached_conditioning, encode_rows, every_crop
from dreambooth_offset.training.data import (Example, crop_is_random, crop_top_left, draw_bucket_examples, draw_examples,
                                             epoch_indices)
from dreambooth_offset.training.family import Conditioning, encode_prompts, time_ids, tokenize
from dreambooth_offset.training.models import sample_latents

STREAMS = {"instance": 0, "class": 1}


class Batch(NamedTuple):
    latents: Tensor  # (B, C, h, w), scaled by the VAE's scaling_factor
    input_ids: Tensor  # (B, L) token ids (SDXL: (B, 2, L)), used when a text encoder trains
    conditioning: Conditioning | None  # the encoders' output when they are all frozen
    num_instance: int  # rows [0, num_instance) are instance rows, the rest class rows
    time_ids: Tensor | None = None  # SDXL: (B, 6) original size, crop top-left, target size per row
    mask: Tensor | None = None  # --masked_loss: (B, 1, h, w) per-latent-pixel loss weights in [0, 1]
    # --output_preservation_prompts: the caption of each instance row's twin, as token ids (n, L) and,
    # with frozen text encoders, their output
    twin_ids: Tensor | None = None
    twin_conditioning: Conditioning | None = None


class BatchSource:
    def __init__(self, images: dict[str, list[Tensor]], captions: dict[str, list[str]], cfg: DataConfig,
                 parts, train_text_encoder: bool, seed: int, process_index: int, num_processes: int,
                 sizes: dict[str, list[tuple[int, int]]] | None = None, repeats: dict[str, list[int]] | None = None,
                 policies: dict[str, list[CaptionPolicy]] | None = None,
                 buckets: list[tuple[int, int]] | None = None):
        """`captions[source][i]` is the caption of `images[source][i]` before the caption options,
        `repeats[source][i]` its repeats (default 1), `policies[source][i]` its caption options
        (default: the flags'). `sizes[source][i]` is the image's original (height, width); given
        (SDXL), every batch carries its rows' time ids. `buckets[i]` (--enable_bucket) is instance
        image i's bucket (width, height): each batch's instance rows then come from one bucket, and
        its class rows are cropped to the same one."""
        self.images, self.cfg, self.vae, self.seed, self.sizes = images, cfg, parts.vae, seed, sizes
        self.process_index, self.num_processes = process_index, num_processes
        self.slots = {src: [i for i, r in enumerate((repeats or {}).get(src) or [1] * len(imgs)) for _ in range(r)]
                      for src, imgs in images.items()}
        self.policies = policies or {src: [caption_policy(cfg)] * len(caps) for src, caps in captions.items()}
        self.random_captions = any(p.is_random for ps in self.policies.values() for p in ps)
        self.captions, self.tokenizers, self.embeddings = captions, parts.tokenizers, None
        if not self.random_captions:  # fixed captions (a prefix / suffix at most)
            fixed = [apply_policy(c, p) for src, caps in captions.items() for c, p in zip(caps, self.policies[src])]
            row_of = {c: i for i, c in enumerate(dict.fromkeys(fixed))}
            rows = iter(row_of[c] for c in fixed)
            self.caption_row = {src: [next(rows) for _ in caps] for src, caps in captions.items()}
            self.input_ids = tokenize(parts.tokenizers, list(row_of))
            if cfg.caches_text:
                self.embeddings, report = cached_conditioning(
                    parts.text_encoders, self.input_ids,
                    cache_folder(cfg, "text") if cfg.cache_text_encoder_outputs_to_disk else None)
                print(report)
            elif not train_text_encoder:  # frozen encoders give the same context every step
                with torch.no_grad():
                    self.embeddings = encode_prompts(parts.text_encoders, self.input_ids)
        self.twins = self._twin_prompts(cfg.output_preservation_prompts, parts, train_text_encoder)
        self.slot_buckets, self._epoch = None, (None, None)
        if buckets is not None:
            self.slot_buckets = [buckets[i] for i in self.slots["instance"]]
            b = cfg.train_batch_size
            self.batches_per_epoch = sum(-(-n // b) for n in Counter(self.slot_buckets).values())
        self.cache = self._latent_cache(buckets)

    @staticmethod
    def _twin_prompts(prompts: tuple[str, ...], parts, train_text_encoder: bool):
        """(token ids, conditioning or None) of the output-preservation captions; None when there are none."""
        if not prompts:
            return None
        ids = tokenize(parts.tokenizers, list(prompts))
        if train_text_encoder:
            return ids, None
        with torch.no_grad():
            return ids, encode_prompts(parts.text_encoders, ids)

    def _latent_cache(self, buckets: list[tuple[int, int]] | None) -> LatentCache | None:
        """The posterior cache when every crop is fixed (filled now under --cache_latents), else None."""
        cfg, images = self.cfg, self.images
        fixed = cfg.center_crop if buckets is not None else \
            not any(crop_is_random(imgs, cfg.resolution, cfg.center_crop) for imgs in images.values())
        if cfg.caches_latents and not fixed:
            raise UsageError("--cache_latents: crops are random (images larger than --resolution, or buckets, "
                             "without --center_crop), so no two steps see the same latents; add --center_crop")
        if not fixed:
            return None
        folder = cache_folder(cfg, "latents") if cfg.cache_latents_to_disk else None
        cache = LatentCache(self.vae, images, cfg.resolution, cfg.masked_loss, folder)
        if cfg.caches_latents:
            print(cache.fill(every_crop(images, cfg.resolution, cfg.random_flip, buckets)))
        return cache

    def idle_parts(self, parts) -> tuple[torch.nn.Module, ...]:
        """The frozen parts of `parts` that no batch calls (training/offload.py parks them): the VAE
        when every crop was encoded before the first step, the text encoders when one conditioning
        serves every step (computed above only when every encoder is frozen and the captions fixed)."""
        vae = (parts.vae,) if self.cache is not None and self.cfg.caches_latents else ()
        return vae + (parts.text_encoders if self.embeddings is not None else ())

    def _bucket_batch(self, k: int) -> list[int]:
        """The instance slots of global batch `k` in bucket mode (one epoch's batch list kept)."""
        epoch, pos = divmod(k, self.batches_per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.slot_buckets, self.cfg.train_batch_size, self.seed,
                                                STREAMS["instance"], epoch))
        return self._epoch[1][pos]

    def __call__(self, micro_step: int, generator: torch.Generator) -> Batch:
        """The batch of this process for global micro-step `micro_step` (0, 1, 2, ...)."""
        k = micro_step * self.num_processes + self.process_index  # the global batch
        batch = self._from_bucket(k, generator) if self.slot_buckets is not None else self._from_slots(k, generator)
        return self._with_twins(batch, k)

    def _from_slots(self, k: int, generator: torch.Generator) -> Batch:
        """Global batch `k` without buckets: `train_batch_size` rows of each source, in epoch order."""
        b = self.cfg.train_batch_size
        start, examples = k * b, []
        for source, imgs in self.images.items():
            slots = self.slots[source]
            indices = [slots[i] for i in epoch_indices(len(slots), start, b, self.seed, STREAMS[source])]
            examples += draw_examples(source, imgs, indices, self.cfg.resolution, self.cfg.center_crop,
                                      self.cfg.random_flip, generator)
        return self._batch(examples, generator)

    def _with_twins(self, batch: Batch, k: int) -> Batch:
        """`batch` (global batch `k`) with its instance rows' output-preservation captions: the prompts
        in turn, `train_batch_size` per batch, so every one comes round as often as the others."""
        if self.twins is None:
            return batch
        ids, cond = self.twins
        rows = (k * self.cfg.train_batch_size + torch.arange(batch.num_instance)) % ids.shape[0]
        return batch._replace(twin_ids=ids[rows], twin_conditioning=None if cond is None else cond.rows(rows))

    def _from_bucket(self, k: int, generator: torch.Generator) -> Batch:
        slots = self._bucket_batch(k)
        bucket = self.slot_buckets[slots[0]]
        n, flips = len(slots), (self.cfg.center_crop, self.cfg.random_flip)
        examples = draw_bucket_examples("instance", self.images["instance"], [self.slots["instance"][s] for s in slots],
                                        bucket, *flips, generator)
        if "class" in self.images:  # as many class rows as instance rows, cropped to the batch's bucket
            class_slots = self.slots["class"]
            indices = [class_slots[j] for j in epoch_indices(len(class_slots), k * self.cfg.train_batch_size, n,
                                                             self.seed, STREAMS["class"])]
            examples += draw_bucket_examples("class", self.images["class"], indices, bucket, *flips, generator)
        return self._batch(examples, generator)

    def _batch(self, examples: list[Example], generator: torch.Generator) -> Batch:
        if self.cache is None:
            rows = encode_rows(self.vae, examples, self.images, self.cfg.resolution, self.cfg.masked_loss)
            mean, std, mask = rows["mean"], rows["std"], rows.get("mask")
        else:
            mean, std, mask = self.cache(examples)
        latents = sample_latents(mean, std, self.vae.config, generator)
        if self.random_captions:
            texts = [apply_policy(self.captions[e.source][e.index], self.policies[e.source][e.index], generator)
                     for e in examples]
            input_ids, context = tokenize(self.tokenizers, texts), None
        else:
            rows = torch.tensor([self.caption_row[e.source][e.index] for e in examples])
            input_ids, context = self.input_ids[rows], None if self.embeddings is None else self.embeddings.rows(rows)
        return Batch(latents, input_ids, context, sum(e.source == "instance" for e in examples),
                     self._time_ids(examples), mask)

    def _time_ids(self, examples: list[Example]) -> Tensor | None:
        if self.sizes is None:
            return None
        res = self.cfg.resolution
        return torch.stack([time_ids(self.sizes[e.source][e.index],
                                     crop_top_left(e, shape_of(self.images[e.source], e.index)[2], res),
                                     e.target or (res, res))
                            for e in examples])
