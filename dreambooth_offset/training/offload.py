"""Frozen parts that no training step calls, kept in CPU memory while the steps run.

With every latent cached before the first step (--cache_latents) the VAE has nothing left to
encode; with fixed captions and frozen text encoders (--cache_text_encoder_outputs, or the
one-time encoding of fixed captions) the encoders have nothing left to encode either. On a GPU
they would still hold their weights there: under fp16 about 0.6 GB for SD 1.5 and 2.0 GB for
SDXL (both VAEs stay in fp32; docs/performance.md, "On a GPU"). kohya's sd-scripts move them
to the CPU in the same case. Sampling and the validation loss call them, so those bring them back
for as long as they run. Which parts are idle is the batch source's to say
(training/batches.BatchSource.idle_parts).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def park(modules: tuple[torch.nn.Module, ...]) -> None:
    """Move `modules` to CPU memory and give the accelerator's cache the memory back."""
    for module in modules:
        module.to("cpu")
    if modules and torch.cuda.is_available():
        torch.cuda.empty_cache()


def unpark(modules: tuple[torch.nn.Module, ...], device: torch.device) -> None:
    for module in modules:
        module.to(device)


@contextmanager
def brought_back(modules: tuple[torch.nn.Module, ...], device: torch.device) -> Iterator[None]:
    """`modules` on `device` while the block runs (sampling, the validation loss), parked again after."""
    unpark(modules, device)
    try:
        yield
    finally:
        park(modules)
