"""The recipe of the shipped base model: the `pretrain-base` command's schema.

`assets/base/pretrain.json` records the recipe the shipped base was made with; `shipped_recipe()`
reads it back, so the experiments use what the base was trained with, not today's defaults.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dreambooth_offset.config.fields import option, section
from dreambooth_offset.errors import UsageError

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "assets" / "base"
# The experiments' prior set on the shipped base: this many images of its own training data
# (experiments/shipped.py writes them; docs/black-image-experiment.md says why).
SHIPPED_PRIOR_SIZE = 256


@dataclass(frozen=True)
class PretrainConfig:
    """Everything `pretrain-base` needs; the model card records it."""

    output_dir: str = option("", "Folder the diffusers pipeline, model card and samples go to.", required=True)
    seed: int = option(0, "Seed of the data, noise, timesteps and weight initialisation.")
    resolution: int = option(64, "Image side in pixels; the 2-block VAE halves it (64 px -> 32x32x4 latents).")
    num_images: int = option(8000, "Size of the fixed captioned set the UNet trains on.")
    vae_channels: tuple[int, ...] = option((16, 32), "VAE block channels.")
    vae_steps: int = option(800, "VAE training steps.")
    vae_batch_size: int = option(16, "VAE batch size.")
    vae_learning_rate: float = option(1e-3, "VAE peak learning rate.")
    kl_weight: float = option(1e-6, "Weight of the VAE's KL term (SD's VAE keeps it tiny as well).")
    unet_channels: tuple[int, ...] = option((32, 64, 64), "UNet block channels.")
    attention_levels: tuple[int, ...] = option((1, 2), "UNet levels that carry cross-attention.")
    norm_num_groups: int = option(
        2, "UNet GroupNorm groups; 16-32 channels per group make the mean easier to learn "
        "(docs/science.md, 'A CPU prototype').")
    cross_attention_dim: int = option(64, "Text-encoder width = the UNet's cross-attention width.")
    text_layers: int = option(2, "Text-encoder layers.")
    unet_steps: int = option(2000, "UNet + text-encoder training steps.")
    batch_size: int = option(16, "UNet batch size.")
    learning_rate: float = option(5e-4, "UNet + text-encoder peak learning rate.")
    caption_dropout: float = option(0.1, "Fraction of empty captions, so classifier-free guidance works.")
    schedule: str = option(
        "leak-matched", "Noise schedule: SD 1.5's exactly ('sd'), or with beta_end chosen so the latents' "
        "mean leaks as at SD's 64x64 ('leak-matched'; docs/science.md, 'The leak').")
    profile_seeds: int = option(8, "Samples per prompt of the brightness profile in the model card.")
    profile_steps: int = option(25, "DDIM steps of the brightness profile.")

    def __post_init__(self):
        if self.schedule not in ("sd", "leak-matched"):
            raise UsageError(f"--schedule must be 'sd' or 'leak-matched', not {self.schedule!r}")
        if self.resolution % 2**(len(self.vae_channels) - 1):
            raise UsageError("--resolution must be divisible by the VAE's downsampling factor")
        if min(self.unet_channels) % self.norm_num_groups or min(self.vae_channels) % 8:
            raise UsageError("UNet channels must be divisible by --norm_num_groups (VAE: by 8)")
        if any(s < 1 for s in (self.num_images, self.vae_steps, self.unet_steps, self.batch_size)):
            raise UsageError("steps, batch sizes and --num_images must be positive")

    @property
    def latent_size(self) -> int:
        return self.resolution // 2**(len(self.vae_channels) - 1)


@dataclass(frozen=True)
class ProcessConfig:
    num_threads: int | None = option(None, "torch CPU threads (default: torch's choice).")


@dataclass(frozen=True)
class PretrainCommand:
    """`pretrain-base`: the recipe, and how this process runs it."""

    recipe: PretrainConfig = section(PretrainConfig)
    process: ProcessConfig = section(ProcessConfig)


def shipped_recipe() -> PretrainConfig:
    """The recipe recorded in the shipped base's pretrain.json."""
    from dreambooth_offset.config.load import load_config

    recorded = json.loads((SHIPPED_BASE / "pretrain.json").read_text())["config"]
    return load_config(None, recorded, PretrainCommand).recipe
