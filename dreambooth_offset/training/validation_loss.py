"""Validation loss (kohya's --validation_split / --validate_every_n_steps): instance images held
out of training, scored at fixed timesteps with fixed noise and their posterior means, so the
curve moves only when the model does, never with the draw."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dreambooth_offset.config import RunConfig
from dreambooth_offset.errors import UsageError
from dreambooth_offset.noise.noise import sample_noise
from dreambooth_offset.noise.objective import training_target
from dreambooth_offset.training.data import center_offsets, to_pixels
from dreambooth_offset.training.family import encode_prompts, predict, time_ids, tokenize
from dreambooth_offset.training.models import latent_distribution, scale_latents

NUM_TIMESTEPS = 5  # evenly spread over the trained range
SEED_OFFSET = 7919  # the held-out noise's own stream, apart from the run's generator


def held_out_indices(n: int, fraction: float, seed: int) -> list[int]:
    """Which of `n` instance images are held out: round(fraction * n) of them (at least one, never
    all), by a seeded permutation."""
    count = max(1, round(fraction * n))
    if n < 2 or count >= n:
        raise UsageError(f"validation_split = {fraction} of {n} instance image(s) leaves none to train on; "
                         "lower it or add images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + SEED_OFFSET))
    return sorted(order[:count].tolist())


def split_held_out(data: tuple[dict, ...], fraction: float, seed: int) -> tuple[list, ...] | None:
    """Move the held-out instance rows out of each per-source dict of `data` (images, captions,
    sizes), before anything else sees them; returns them (one list per dict), or None at 0."""
    if fraction <= 0:
        return None
    n = len(data[0]["instance"])
    keep = set(held_out_indices(n, fraction, seed))
    held_rows, rest = [i for i in range(n) if i in keep], [i for i in range(n) if i not in keep]
    held = tuple(_pick(d["instance"], held_rows) for d in data)
    for d in data:
        d["instance"] = _pick(d["instance"], rest)
    return held


def _pick(values, rows: list[int]):
    """The `rows` of a list, or of an image store (data/images.py) without decoding it."""
    return values.select(rows) if hasattr(values, "select") else [values[i] for i in rows]


class HeldOut(NamedTuple):
    latents: Tensor  # (N * T, C, h, w): each image's posterior mean once per timestep
    noise: Tensor  # fixed, drawn once with the run's noise settings
    timesteps: Tensor
    input_ids: Tensor
    time_ids: Tensor | None  # SDXL


@torch.no_grad()
def held_out_set(images: list[Tensor], captions: list[str], sizes: list[tuple[int, int]], parts,
                 cfg: RunConfig) -> HeldOut:
    """The held-out images (uint8, resized) as fixed inputs: centre crops, posterior means."""
    res = cfg.data.resolution
    crops = [to_pixels(img, *center_offsets(img.shape, res), False, res) for img in images]
    mean, _ = latent_distribution(parts.vae, torch.stack(crops))
    latents = scale_latents(mean, parts.vae.config)
    low = cfg.loss.min_timestep
    high = cfg.loss.max_timestep or parts.noise_scheduler.config.num_train_timesteps
    steps = torch.linspace(low, high - 1, NUM_TIMESTEPS).round().long()
    latents = latents.repeat_interleave(NUM_TIMESTEPS, dim=0)
    g = torch.Generator().manual_seed(cfg.train.seed + SEED_OFFSET)
    noise = sample_noise(latents.cpu(), cfg.noise, g).to(latents.device)
    times = None
    if parts.family == "sdxl":
        times = torch.stack([time_ids(size, center_offsets(img.shape, res), (res, res)) for img, size in zip(images, sizes)])
        times = times.repeat_interleave(NUM_TIMESTEPS, dim=0)
    ids = tokenize(parts.tokenizers, captions).repeat_interleave(NUM_TIMESTEPS, dim=0)
    return HeldOut(latents, noise, steps.repeat(len(images)).to(latents.device), ids, times)


@torch.no_grad()
def validation_loss(run, held: HeldOut, batch_size: int = 8) -> float:
    """The mean squared error of the run's model on the held-out set (dropout off)."""
    scheduler, unet = run.parts.noise_scheduler, run.unet
    for model in run.trained:
        model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, held.latents.shape[0], batch_size):
            rows = slice(i, i + batch_size)
            latents, noise, t = held.latents[rows], held.noise[rows], held.timesteps[rows]
            cond = encode_prompts(run.encoders, held.input_ids[rows].to(latents.device))
            times = None if held.time_ids is None else held.time_ids[rows]
            pred = predict(unet, scheduler.add_noise(latents, noise, t), t, cond, times)
            err = (pred.float() - training_target(scheduler, latents, noise, t).float()).pow(2)
            total += err.mean(dim=tuple(range(1, err.ndim))).sum().item()
            count += latents.shape[0]
    finally:
        for model in run.trained:
            model.train()
    return total / count
