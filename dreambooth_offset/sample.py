"""Generation with a LoRA, image grids and brightness statistics; the `generate` subcommand."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dreambooth_offset.errors import UsageError

DARK_THRESHOLD = 0.05
BRIGHT_THRESHOLD = 0.95


def luminance(images: Tensor) -> Tensor:
    """Rec. 709 luma Y = 0.2126 R + 0.7152 G + 0.0722 B of RGB images in [0, 1]: (..., 3, H, W) -> (..., H, W)."""
    weights = torch.tensor([0.2126, 0.7152, 0.0722], dtype=images.dtype, device=images.device)
    return (images * weights.view(3, 1, 1)).sum(dim=-3)


def mean_luminance(images: Tensor) -> Tensor:
    """Per-image mean luminance in [0, 1], shape (N,)."""
    return luminance(images).mean(dim=(1, 2))


def dark_fraction(images: Tensor, threshold: float = DARK_THRESHOLD) -> Tensor:
    """Per-image fraction of pixels with luminance below `threshold`, shape (N,)."""
    return (luminance(images) < threshold).float().mean(dim=(1, 2))


def bright_fraction(images: Tensor, threshold: float = BRIGHT_THRESHOLD) -> Tensor:
    return (luminance(images) > threshold).float().mean(dim=(1, 2))


def to_pil(images: Tensor) -> list[Image.Image]:
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images row by row."""
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def sampler_overrides(scheduler_config) -> dict[str, object]:
    """Under zero terminal SNR, sampling must start at t = T: "trailing" spacing (Lin et al. 2023,
    sec. 3.3); SD's "leading" spacing with 50 steps starts at t = 981 and never sees pure noise."""
    return {"timestep_spacing": "trailing"} if scheduler_config.get("rescale_betas_zero_snr") else {}


def default_guidance_rescale(zero_terminal_snr: bool) -> float:
    """Lin et al. 2023 (sec. 3.4) rescale classifier-free guidance by 0.7 under zero terminal SNR."""
    return 0.7 if zero_terminal_snr else 0.0


def build_pipeline(tokenizer, text_encoder, vae, unet, scheduler_config):
    """A StableDiffusionPipeline over the given parts, with a DDIM sampler from the model's config
    ("trailing" timesteps when the config has zero-terminal-SNR betas)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config, **sampler_overrides(scheduler_config)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
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
    (`latents / scaling_factor`, then [-1, 1] -> [0, 1]), so the final latents are kept too."""
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
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        decoded = vae.decode((final / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        images.append((decoded.float().cpu() / 2 + 0.5).clamp(0, 1))
        finals.append(final.float().cpu())
    return Samples(torch.cat(images), latents, torch.cat(finals))


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="Sample images from a base model with an optional LoRA.")
    p.add_argument("--pretrained_model_name_or_path", required=True, help="Base diffusers folder (or cached hub id).")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None)
    p.add_argument("--lora", default=None, help="A LoRA folder or .safetensors file (diffusers or WebUI format).")
    p.add_argument("--lora_scale", type=float, default=1.0, help="Strength of the LoRA.")
    p.add_argument("--prompt", nargs="+", required=True, help="One or more prompts.")
    p.add_argument("--num_images", type=int, default=4, help="Images per prompt (seeds seed .. seed+N-1).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--guidance_rescale", type=float, default=None,
                   help="CFG rescale (Lin et al. 2023); default 0.7 with --zero_terminal_snr, else 0.")
    p.add_argument("--zero_terminal_snr", action="store_true",
                   help="Sample with zero-terminal-SNR betas and trailing timesteps, as a LoRA trained with them.")
    p.add_argument("--prediction_type", default=None, choices=("epsilon", "v_prediction"),
                   help="Override the model's prediction type (as the LoRA was trained).")
    p.add_argument("--resolution", type=int, default=None, help="Image side in pixels (default: the model's).")
    p.add_argument("--output_dir", required=True, help="Where images, grids and stats.json go.")
    p.set_defaults(func=run_generate)


def load_pipeline(model_cfg, lora: str | None = None, lora_scale: float = 1.0, zero_terminal_snr: bool = False,
                  prediction_type: str | None = None):
    """Base parts from local files (the training loader), plus an optional LoRA through diffusers.
    `zero_terminal_snr` / `prediction_type` adjust the scheduler as the training did."""
    from dreambooth_offset.models import load_parts

    parts = load_parts(model_cfg, zero_terminal_snr, prediction_type)
    pipe = build_pipeline(parts.tokenizer, parts.text_encoder, parts.vae, parts.unet, parts.noise_scheduler.config)
    if lora:
        path = Path(lora)
        if not path.exists():
            raise UsageError(f"--lora {lora}: no such file or folder")
        try:
            if path.is_file():
                pipe.load_lora_weights(str(path.parent), weight_name=path.name)
            else:
                pipe.load_lora_weights(str(path))
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"--lora {lora}: cannot load it ({str(err).splitlines()[0]})") from None
        if lora_scale != 1.0:
            pipe.fuse_lora(lora_scale=lora_scale)
    return pipe


def run_generate(args: argparse.Namespace) -> int:
    import json

    from dreambooth_offset.config import ModelConfig

    if args.num_images < 1:
        raise UsageError("--num_images must be at least 1")
    if args.resolution is not None and args.resolution % 8:
        raise UsageError(f"--resolution {args.resolution}: it must be a multiple of 8")
    if args.zero_terminal_snr and args.prediction_type != "v_prediction":
        raise UsageError("--zero_terminal_snr needs --prediction_type v_prediction (as in training)")
    rescale = args.guidance_rescale if args.guidance_rescale is not None else default_guidance_rescale(args.zero_terminal_snr)
    if not 0.0 <= rescale <= 1.0:
        raise UsageError(f"--guidance_rescale {rescale}: it must be in [0, 1]")
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--output_dir {out}: cannot create it ({err.strerror})") from None
    model_cfg = ModelConfig(args.pretrained_model_name_or_path, args.revision, args.variant)
    pipe = load_pipeline(model_cfg, args.lora, args.lora_scale, args.zero_terminal_snr, args.prediction_type)
    seeds = list(range(args.seed, args.seed + args.num_images))
    stats = {}
    from tqdm.auto import tqdm

    for p_idx, prompt in enumerate(tqdm(args.prompt, desc="prompts")):
        samples = generate(pipe, prompt, seeds, args.num_inference_steps, args.guidance_scale, args.resolution,
                           args.resolution, guidance_rescale=rescale)
        pil = to_pil(samples.images)
        for seed, img in zip(seeds, pil):
            img.save(out / f"prompt{p_idx:02d}_seed{seed}.png")
        make_grid(pil).save(out / f"prompt{p_idx:02d}_grid.png")
        lum, dark = mean_luminance(samples.images), dark_fraction(samples.images)
        stats[prompt] = {"seeds": seeds, "mean_luminance": lum.tolist(), "dark_fraction": dark.tolist()}
        print(f"{prompt!r}: mean luminance {lum.mean():.3f} +- {lum.std(unbiased=False):.3f}")
        for seed, l, d in zip(seeds, lum.tolist(), dark.tolist()):
            print(f"  seed {seed}: mean luminance {l:.3f}, pixels < {DARK_THRESHOLD}: {d:.1%}")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"images, grids and stats.json in {out}")
    return 0


def run_validation(accelerator, parts, unet, text_encoder, cfg, step: int) -> dict[str, float]:
    """Sample each validation prompt from fixed seeds, save a grid per step and log luminance."""
    from tqdm.auto import tqdm

    vcfg = cfg.validation
    pipe = build_pipeline(
        parts.tokenizer,
        accelerator.unwrap_model(text_encoder) if text_encoder is not None else parts.text_encoder,
        parts.vae,
        accelerator.unwrap_model(unet),
        parts.noise_scheduler.config,
    )
    pipe.unet.eval()  # no LoRA dropout while sampling; the loop sets train() again
    pipe.text_encoder.eval()
    seeds = list(range(cfg.train.seed, cfg.train.seed + vcfg.num_validation_images))
    rescale = vcfg.guidance_rescale
    if rescale is None:
        rescale = default_guidance_rescale(cfg.noise.zero_terminal_snr)
    rows, logs = [], {}
    for i, prompt in enumerate(vcfg.validation_prompt):
        samples = generate(pipe, prompt, seeds, vcfg.num_inference_steps, vcfg.guidance_scale,
                           cfg.data.resolution, cfg.data.resolution, guidance_rescale=rescale)
        rows += to_pil(samples.images)
        lum = mean_luminance(samples.images)
        logs[f"validation/luminance_{i}"] = lum.mean().item()
        for seed, value in zip(seeds, lum.tolist()):
            logs[f"validation/luminance_{i}_seed{seed}"] = value
        tqdm.write(f"step {step} validation {prompt!r}: mean luminance " + ", ".join(f"{v:.3f}" for v in lum.tolist()))
    folder = Path(cfg.train.output_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    make_grid(rows, cols=len(seeds)).save(folder / f"step-{step:06d}.png")
    accelerator.log(logs, step=step)
    return logs
