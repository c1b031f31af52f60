"""Sampling a Stable Diffusion pipeline from fixed start noises; the pipeline with a LoRA."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.family import SDXL
from dreambooth_offset.training.models import decode_images, unscale_latents


def sampler_overrides(scheduler_config) -> dict[str, object]:
    """Under zero terminal SNR, sampling must start at t = T: "trailing" spacing (Lin et al. 2023,
    sec. 3.3); SD's "leading" spacing with 50 steps starts at t = 981 and never sees pure noise."""
    return {"timestep_spacing": "trailing"} if scheduler_config.get("rescale_betas_zero_snr") else {}


def build_pipeline(parts, unet=None, text_encoders=None):
    """The family's pipeline (StableDiffusionPipeline, or StableDiffusionXLPipeline) over the loaded
    `parts` (training/models.py SDParts), with `unet` / `text_encoders` in place of the frozen ones
    when given, and a DDIM sampler from the model's config ("trailing" timesteps when the config
    has zero-terminal-SNR betas)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    config = parts.noise_scheduler.config
    encoders = text_encoders or parts.text_encoders
    common = {"vae": parts.vae, "unet": unet or parts.unet, "tokenizer": parts.tokenizer, "text_encoder": encoders[0],
              "scheduler": DDIMScheduler.from_config(config, **sampler_overrides(config))}
    if parts.family == SDXL:
        pipe = StableDiffusionXLPipeline(**common, tokenizer_2=parts.tokenizer_2, text_encoder_2=encoders[1],
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Samples(NamedTuple):
    images: Tensor  # (N, 3, H, W) in [0, 1], fp32, CPU
    start_latents: Tensor  # (N, C, h, w): the x_T each image started from
    final_latents: Tensor  # (N, C, h, w): the sampler's x_0, in the UNet's (scaled) latent space


def start_latents(pipe, seeds: list[int], height: int, width: int) -> Tensor:
    """x_T for each seed, drawn on the CPU so a seed gives the same start on any device."""
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def antithetic_start_latents(pipe, n: int, height: int, width: int) -> Tensor:
    """`n` (even) start latents in antithetic pairs: x_T of seeds 0 .. n/2-1, each followed by its
    negation, an equally likely draw. A sample's brightness follows its start noise's channel
    means, so the two of a pair err in opposite directions and their mean is a much sharper
    estimate than two independent samples give (docs/science.md, "Antithetic start noises")."""
    if n % 2:
        raise ValueError(f"{n} start latents cannot come in antithetic pairs: give an even number")
    z = start_latents(pipe, list(range(n // 2)), height, width)
    return torch.stack((z, -z), dim=1).flatten(0, 1)


@torch.no_grad()
def generate(
    pipe,
    prompt: str | list[str],
    seeds: list[int],
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    latents: Tensor | None = None,
    batch_size: int = 8,
    guidance_rescale: float = 0.0,
) -> Samples:
    """One image per seed (or per given start latent), in batches; returns images, x_T and x_0.
    `prompt` is one prompt for all images or a list with one prompt per image.

    The pipeline stops at the latents and the VAE decodes them here, as the pipeline would
    (`unscale_latents`, then [-1, 1] -> [0, 1]), so the final latents are kept too."""
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if latents is None:
        latents = start_latents(pipe, seeds, height, width)
    prompts = [prompt] * len(latents) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(latents):
        raise ValueError(f"{len(prompts)} prompts for {len(latents)} images")
    images, finals = [], []
    vae = pipe.vae
    for i in range(0, len(latents), batch_size):
        chunk = latents[i : i + batch_size]
        final = pipe(
            prompts[i : i + batch_size],
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            latents=chunk.to(pipe.device, pipe.unet.dtype),
            output_type="latent",
        ).images
        images.append(decode_images(vae, unscale_latents(final, vae.config)))
        finals.append(final.float().cpu())
    return Samples(torch.cat(images), latents, torch.cat(finals))


def load_pipeline(model_cfg, lora: str | None = None, lora_scale: float = 1.0, zero_terminal_snr: bool = False,
                  prediction_type: str | None = None):
    """Base parts from local files (the training loader), plus an optional LoRA through diffusers.
    `zero_terminal_snr` / `prediction_type` adjust the scheduler as the training did."""
    from dreambooth_offset.training.models import load_parts

    parts = load_parts(model_cfg, zero_terminal_snr, prediction_type)
    pipe = build_pipeline(parts)
    if lora:
        from dreambooth_offset.webui import lora_file
        from dreambooth_offset.webui.fit import check_fits, module_shapes

        path = Path(lora)
        if not path.exists():
            raise UsageError(f"--lora {lora}: no such file or folder")
        file = lora_file.resolve(path)
        _, modules, _ = lora_file.read_modules(file)  # refuses pickles and damaged files unopened by diffusers
        shapes = module_shapes(unet=parts.unet, **dict(zip(("text_encoder", "text_encoder_2"), parts.text_encoders)))
        check_fits(modules, shapes, f"--lora {lora}", str(model_cfg.pretrained_model_name_or_path))
        try:
            pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        except (OSError, ValueError, KeyError, TypeError) as err:  # TypeError: diffusers' LoraConfig(**metadata)
            why = "; ".join(str(e).splitlines()[0] for e in (err, err.__cause__) if e is not None)
            raise UsageError(f"--lora {lora}: cannot load it ({why})") from None
        if lora_scale != 1.0:
            pipe.fuse_lora(lora_scale=lora_scale)
    return pipe
